"""FSDP2 for a `DiffModel` (`diffprune train --fsdp`): the frozen weights sharded per block, the diff
state sharded per tensor, and no process ever holding all of either.

`setup` / `shard(dm, mesh)` apply ``torch.distributed.fsdp.fully_shard`` to every block of the wrapped
model (the classes a transformers model names in ``_no_split_modules``: ``BertLayer``,
``LlamaDecoderLayer``, ...; FSDP2 moves each block to the mesh's device as it shards it) and to the
wrapped model as the root (embeddings, final norm, head). The DiffModel was built without its L0 state;
it is allocated only then, each tensor of w and alpha born as a DTensor sharded on its first dimension
(`new_state`), and `shard_slots` does the same for state made later as full tensors (the kept values
after projection, a restored checkpoint). So each process holds 1/world of theta, of w and alpha, of
their gradients and of their AdamW moments.

How a step runs: a block's FSDP pre-forward gathers its theta; inside it, each module that owns a
diffed tensor gathers that one tensor's diff state (`whole`: an all-gather whose backward is a
reduce-scatter that averages the processes' gradients, as FSDP does for the head) and computes
theta + delta with the full tensors, exactly as one process would. So the gate noise, drawn per
tensor from the step's seed, is the same on every process: under `--fsdp` the loop gives every
process the same seed per step (`step_seed`), and a sharded run equals one process that takes the
same global batch. The sharded diff state is gathered back for checkpoints and the saved diff
(`full`, a collective: every process calls it).

Gradient clipping: every trainable tensor is then a DTensor on one mesh, so
``torch.nn.utils.clip_grad_norm_`` computes the global norm over all shards (one all-reduce) and
scales each shard by the same factor: the clipping of one process with the global batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


def _dtensor():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    return DTensor, Partial, Replicate, Shard, distribute_tensor


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a (possibly sharded) diff-state tensor, as a plain tensor; differentiable: its
    gradient is averaged over the processes and scattered back onto the shards. A plain tensor is
    returned as it is. A collective when sharded: every process must call it in the same order."""
    if not is_dtensor(t):
        return t
    DTensor, Partial, Replicate, _, _ = _dtensor()
    return t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim).to_local(
        grad_placements=[Partial("avg")] * t.device_mesh.ndim)


@torch.no_grad()
def full(t: torch.Tensor) -> torch.Tensor:
    """A detached full copy of `t` (gathered when sharded; a collective then)."""
    return t.full_tensor().detach() if is_dtensor(t) else t.detach()


def new_state(shape, fill: float, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A tensor of diff state filled with `fill`, beside the weight `like`: a plain tensor on its device, or,
    when `like` is sharded, a DTensor born sharded on dim 0 over its mesh (a 0-dim one replicated), so that
    no process ever holds the whole of it."""
    if not is_dtensor(like):
        return torch.full(tuple(shape), fill, dtype=dtype, device=like.device)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import full as dfull

    return dfull(tuple(shape), fill, dtype=dtype, device_mesh=like.device_mesh,
                 placements=[Shard(0) if len(shape) else Replicate()])


@torch.no_grad()
def assign(p: torch.Tensor, value: torch.Tensor) -> None:
    """p = value (the full tensor), into p's shard when p is sharded."""
    if is_dtensor(p):
        _, _, _, _, distribute_tensor = _dtensor()
        p.copy_(distribute_tensor(value.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements))
    else:
        p.copy_(value)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: those whose class the model names in ``_no_split_modules``,
    innermost first, leaving out any block that shares a parameter with a module outside it (tied
    weights stay in the root's group)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(
            f"--fsdp: {type(model).__name__} names no blocks to shard (transformers models list them in "
            "_no_split_modules); set model._no_split_modules = ['YourBlockClass'] or train without --fsdp"
        )
    owners: dict[int, set[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(mod_name)
    out = []
    for mod_name, module in reversed(list(model.named_modules())):
        if type(module).__name__ not in names:
            continue
        inside = mod_name + "."
        own = {id(p) for p in module.parameters()}
        if all(all(o == mod_name or o.startswith(inside) for o in owners[i]) for i in own):
            out.append(module)
    if not out:
        raise ConfigError(f"--fsdp: {type(model).__name__} has no module of its block classes {sorted(names)}")
    return out


def mesh(device: torch.device):
    """A 1-D mesh over every process of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def setup(dm, device: torch.device, world: int) -> int:
    """`diffprune train --fsdp`: `dm` was built without its L0 state and is still on the CPU. With several
    processes, shard it (`shard`); with one, allocate the state and move it to `device`. Returns the
    number of blocks sharded (0 with one process)."""
    if world > 1:
        return shard(dm, mesh(device))
    if dm.stage == "l0" and not len(dm.slots):
        dm.allocate_l0_state()
    dm.to(device)
    return 0


def shard(dm, device_mesh) -> int:
    """Shard `dm` over `device_mesh` (see the module docstring); returns the number of blocks.

    The frozen weights are sharded block by block (FSDP2 moves each block to the mesh's device as it shards
    it, so the device never holds the whole model), then the L0 state, if `dm` was built without it, is
    allocated born sharded (`new_state`): no process holds all of theta, w or alpha at any time."""
    from torch.distributed.fsdp import fully_shard

    found = blocks(dm.model)
    for block in found:
        fully_shard(block, mesh=device_mesh)
    fully_shard(dm.model, mesh=device_mesh)
    if dm.stage == "l0" and not len(dm.slots):
        dm.allocate_l0_state()
    shard_slots(dm, device_mesh)
    dm.to(device_mesh.device_type)  # what FSDP does not manage (buffers outside its groups)
    dm.sharded = True
    return len(found)


def shard_slots(dm, device_mesh=None) -> None:
    """Every trainable diff-state tensor of `dm` as a DTensor sharded on dim 0 (a 0-dim one, the group
    logit, replicated). Idempotent; `dm`'s current slots (after `project`, `set_candidates` or a loaded
    checkpoint they are new, full tensors) are sharded, before an optimiser is built over them."""
    _, _, Replicate, Shard, distribute_tensor = _dtensor()
    if device_mesh is None:
        device_mesh = next((p.device_mesh for p in dm.model.parameters() if is_dtensor(p)), None)
        if device_mesh is None:
            return
    for slot in dm.slots.values():
        for name, p in list(slot._parameters.items()):
            if p is None or is_dtensor(p) or not p.requires_grad:
                continue
            placements = [Shard(0) if p.dim() else Replicate()]
            slot._parameters[name] = nn.Parameter(distribute_tensor(p.detach(), device_mesh, placements))


def reshard(dm) -> None:
    """Every FSDP group back to its shards. A forward without a backward (validation) leaves the root
    group's parameters all-gathered, as plain tensors in the modules' places; an optimiser built then
    would hold those throwaway copies instead of the sharded parameters, and never update them (the
    head did not train in the fixed-mask stage before this was called there)."""
    from torch.distributed.fsdp import FSDPModule

    for module in dm.model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def prepare_phase(dm) -> None:
    """Before a phase's optimiser is built: its diff state sharded (`shard_slots`) and every group
    resharded (`reshard`), so the optimiser holds the sharded parameters."""
    shard_slots(dm)
    reshard(dm)


@torch.no_grad()
def unshard(dm) -> None:
    """The trained diff state and head as full tensors on every process (collectives), for the saved diff:
    every slot tensor becomes a plain parameter again, and the FSDP groups holding head parameters are
    all-gathered (`FSDPModule.unshard`). The frozen blocks stay sharded; `dm` only evaluates after this."""
    from torch.distributed.fsdp import FSDPModule

    for slot in dm.slots.values():
        for name, p in list(slot._parameters.items()):
            if p is not None and is_dtensor(p):
                slot._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
    heads = set(dm.head_names)
    for mod_name, module in reversed(list(dm.model.named_modules())):
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, FSDPModule) and any(
                is_dtensor(p) and f"{prefix}{n}" in heads for n, p in module.named_parameters()):
            module.unshard()


@torch.no_grad()
def localize_optimizer_state(optimizer) -> None:
    """After ``load_state_dict`` of a checkpoint (full tensors): each sharded parameter's moments as
    DTensors with that parameter's placements."""
    _, _, _, _, distribute_tensor = _dtensor()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_dtensor(p):
                continue
            state = optimizer.state.get(p, {})
            for key, v in list(state.items()):
                if torch.is_tensor(v) and not is_dtensor(v) and tuple(v.shape) == tuple(p.shape) and v.dim():
                    state[key] = distribute_tensor(v.to(device=p.device), p.device_mesh, p.placements)

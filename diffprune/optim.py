"""AdamW that keeps bfloat16 parameters and moments unbiased: fp32 math, stochastic rounding back.

`--alpha-dtype bf16` stores the gate logits alpha and their AdamW moments in bfloat16. Stepped the
usual way (torch's AdamW in the parameter's dtype, rounding to nearest) most of an L0 stage's
updates are lost: alpha starts at 5, where a bf16 step is 2**-5 = 0.031, and the L0 penalty's
push on an entry whose task gradient is noisy is a small, steady Adam update (lr 0.1 times
|m| / sqrt(v) of a few hundredths) that rounds back to the same value every step; likewise
``v = 0.999 v + 0.001 g**2`` only moves when g**2 > ~3v, so the denominator only ratchets up.
Measured on RTE (MiniLM, 3 epochs): the gates stayed at 98.7% expected density against 6.0% in
fp32. Here a bf16 tensor is stepped in fp32, chunk by chunk (no full-size fp32 copy), by torch's
own fused AdamW kernel on four fp32 chunk buffers, and written back with *stochastic rounding*: x
rounds up with probability equal to its distance from the value below, so E[round(x)] = x and
small updates accumulate as they do in fp32 (the remedy of Zamirai et al. 2020, "Revisiting
BFloat16 Training", and torchao's bf16 AdamW). The first moment changes by 10% of itself per step
and keeps round-to-nearest.

The random bits are a function of (seed, step, tensor): a resumed run draws the ones it would
have drawn, with no generator state to checkpoint. fp32 tensors take torch's AdamW (fused where
the groups ask for it), and the state has torch's layout (``step``, ``exp_avg``, ``exp_avg_sq``),
so state_dict / load_state_dict and the checkpoints are unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from . import blocks, factored
from .noise import Noise

# Per entry of a bf16 tensor with bf16 moments, one idle core: 4.0 ns against 5.6 for the eager chunk
# arithmetic it replaced and 0.6 for fused fp32 AdamW (2026-12-06; 4.15, 5.81 and 0.63 in the 2026-12-07
# run of benchmarks/results/gate_kernels.md); of it,
# loading the chunk ~0.65, the fused kernel ~0.5, the random bits ~1.2, rounding back ~1.6.
_LOW = (torch.bfloat16,)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, noise) -> None:
    """dst (bfloat16) = src (float32, consumed) rounded up or down at random, unbiased.

    `noise`: 16 random bits per entry of src, as an int32 tensor in [0, 2**16) or, on the CPU, a numpy
    uint16 array (`_halves`). Adding them to the 16 bits bf16 drops and truncating rounds the
    magnitude up with probability (dropped bits) / 2**16. On the CPU it is two numpy passes (the
    add, and the shift that writes bf16's bits), where torch needs four."""
    if isinstance(noise, np.ndarray):
        bits = src.detach().numpy().view(np.uint32)
        np.add(bits, noise, out=bits, casting="unsafe")
        np.right_shift(bits, 16, out=dst.detach().view(torch.int16).numpy().view(np.uint16), casting="unsafe")
        return
    bits = src.view(torch.int32)
    bits.add_(noise).bitwise_and_(-65536)
    dst.copy_(src)  # exact: the dropped bits are now 0


def _halves(noise: Noise, n: int):
    """The next n int32 words of `noise` as two sets of 16 random bits: (low halves, high halves), as
    strided numpy uint16 views on the CPU (no masking pass), as masked int32 tensors elsewhere."""
    words = noise.int32(n)
    if words.device.type == "cpu":
        halves = words.numpy().view(np.uint16)  # little-endian: low, high, low, high, ...
        return halves[0::2], halves[1::2]
    return words & 0xFFFF, words.bitwise_right_shift(16).bitwise_and_(0xFFFF)


@torch.no_grad()
def add_stochastic_(acc: torch.Tensor, x: torch.Tensor, key: tuple[int, ...]) -> None:
    """acc (bfloat16) += x, summed in fp32 and rounded back stochastically (unbiased: a long sum of
    small terms keeps them, where round-to-nearest drops every term under half a step of the
    running total). `key` selects the random stream (deterministic)."""
    noise = Noise(key, _local(acc).device).skip(_flat_offset(acc))
    acc, x = _local(acc), _local(x)
    flat_a, flat_x = acc.view(-1), x.reshape(-1)
    chunk = blocks.size(flat_a.device)
    for start in range(0, flat_a.numel(), chunk):
        sl = slice(start, start + chunk)
        total = flat_a[sl].float().add_(flat_x[sl])
        stochastic_round_(flat_a[sl], total, _halves(noise, total.numel())[0])


@torch.no_grad()
def add_stochastic_rows_(acc: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, key: tuple[int, ...]) -> None:
    """acc[rows] += x for sorted distinct `rows` of a CPU bfloat16 `acc`: what `add_stochastic_` gives for
    a tensor that is x in those rows and 0 elsewhere, bit for bit (each entry draws the random bits of
    its position in the whole tensor; the other rows would add an exact 0), touching only those rows."""
    if not rows.numel():
        return
    row = acc[0].numel()
    noise = np.concatenate([_halves(Noise(key, acc.device).skip(r * row), row)[0] for r in rows.tolist()])
    total = acc.index_select(0, rows).float().reshape(-1).add_(x.reshape(-1))
    out = torch.empty(total.numel(), dtype=torch.bfloat16)
    stochastic_round_(out, total, noise)
    acc.index_copy_(0, rows, out.view(rows.numel(), *acc.shape[1:]))


_WORKSPACES: dict = {}


def _workspace(device: torch.device) -> torch.Tensor:
    """Four fp32 chunks (`diffprune.blocks`: 2 MiB on the CPU, 64 MiB elsewhere) per device, allocated
    once: every bf16 tensor's step, inside backward with the activations alive too, reuses them (a fresh
    2 MiB per tensor and step measured ~100 MiB more peak memory on bert-base, from the heap fragmenting
    around them)."""
    key, chunk = str(device), blocks.size(device)
    if key not in _WORKSPACES or _WORKSPACES[key].shape[1] < chunk:
        _WORKSPACES[key] = torch.empty(4, chunk, dtype=torch.float32, device=device)
    return _WORKSPACES[key]


_PACK_MAX = blocks.CPU_BLOCK // 4  # tensors up to this many entries are stepped in packs (`AdamW._step_packs`)


def _packable(p: torch.Tensor) -> bool:
    return (p.numel() <= _PACK_MAX and not hasattr(p, "to_local") and not hasattr(p.grad, "to_local")
            and p.is_contiguous() and p.grad.is_contiguous())


def _low(group: dict, p: torch.Tensor) -> bool:
    """Whether `p` is stepped here rather than by torch's AdamW: a bf16 tensor, or a group asking for bf16
    or factored moments (a tensor with nothing to factor takes bf16 moments, `diffprune.factored`)."""
    return p.dtype in _LOW or group.get("state_dtype") in ("bf16", "factored")


def _factored(group: dict, p: torch.Tensor) -> bool:
    return group.get("state_dtype") == "factored" and factored.factorable(p)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard (FSDP): step the local part


def _flat_offset(t: torch.Tensor) -> int:
    """Where a DTensor shard starts in its whole tensor, flattened (0 for a plain tensor)."""
    if not hasattr(t, "to_local") or t.dim() == 0:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    stride, flat = 1, 0
    for size, o in zip(reversed(t.shape), reversed(offset)):
        flat += o * stride
        stride *= size
    return flat


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW, except that bfloat16 parameters are stepped in fp32 and rounded back
    stochastically (see the module docstring), and so are the moments of a group with
    ``"state_dtype": "bf16"`` (fp32 parameters with bf16 moments: 4 bytes per entry instead of 8); a group with
    ``"state_dtype": "factored"`` keeps a bf16 first moment and a factored second moment for each matrix
    (`diffprune.factored`: 2 bytes per entry). A tensor's random bits are keyed by (`seed`, step,
    `first_index` + its index in the groups): `diffprune.lean.OptimizerInBackward`, one optimiser
    per tensor, passes each tensor's index so that it draws what one optimiser over all would."""

    def __init__(self, params, *args, seed: int = 0, first_index: int = 0, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.seed = seed
        self.first_index = first_index

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every state tensor to its parameter's dtype: the factored sums stay fp32
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        sums = {}
        for i, p in zip(ids, params):
            st = state_dict["state"].get(i, {})
            if "exp_avg_sq_row" in st:
                sums[p] = {k: st[k].to(device=p.device, dtype=torch.float32) for k in ("exp_avg_sq_row", "exp_avg_sq_col")}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and _low(group, p):
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k in st:
                            st[k] = st[k].to(torch.bfloat16)
                if p in sums:
                    st.update(sums[p])

    @torch.no_grad()
    def step(self, closure=None):
        low, held = [], []
        index = self.first_index
        for group in self.param_groups:
            params = group["params"]
            lows = [(i + index, p) for i, p in enumerate(params) if _low(group, p)]
            index += len(params)
            if lows:
                if group.get("amsgrad") or group.get("maximize"):
                    raise ValueError("diffprune.optim.AdamW: amsgrad / maximize are not supported for bfloat16 parameters")
                held.append((group, params))
                group["params"] = [p for p in params if not _low(group, p)]
                low += [(group, i, p) for i, p in lows if p.grad is not None]
        try:
            loss = super().step(closure) if any(g["params"] for g in self.param_groups) else (
                None if closure is None else closure())
        finally:
            for group, params in held:
                group["params"] = params
        packs: dict = {}
        for group, i, p in low:
            if _factored(group, p):
                self._step_factored(group, i, p)
            elif _packable(p):  # small tensors: stepped together, one pass (`_step_pack`)
                packs.setdefault(id(group), (group, []))[1].append((i, p))
            else:
                self._step_low(group, i, p)
        for group, members in packs.values():
            self._step_packs(group, members)
        return loss

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
        return state

    def _step_factored(self, group: dict, index: int, p: torch.Tensor) -> None:
        if not self.state[p]:  # (a defaultdict, as torch's)
            self.state[p] = factored.init_state(p)
        noise = Noise((self.seed, int(self.state[p]["step"].item()) + 1, index), p.device)
        factored.step_(p, self.state[p], group, lambda dst, src: stochastic_round_(dst, src, _halves(noise, src.numel())[0]))

    def _step_packs(self, group: dict, members: list[tuple[int, torch.Tensor]]) -> None:
        """Step small tensors of one group in packs of up to one chunk, the result that of `_step_low`
        per tensor (each tensor draws its own random bits; the fused kernel is elementwise, bit for bit
        for bf16 tensors, to its last bit for fp32 ones, whose entries may fall in its scalar tail alone
        and its vectorised body in a pack):
        one pass instead of a dozen calls per tensor (a gate's candidates in a bias or LayerNorm vector
        are a few dozen entries, and a model has hundreds of such tensors)."""
        states = [self._state(p) for _, p in members]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1.0)
        by_step: dict = {}
        for (index, p), st, n in zip(members, states, torch.stack(steps).tolist()):
            by_step.setdefault((int(n), p.dtype, st["exp_avg_sq"].dtype), []).append((index, p, st))
        for (step, dtype, v_dtype), items in by_step.items():
            pack, size = [], 0
            for item in items:
                if pack and size + item[1].numel() > blocks.size(item[1].device):
                    self._step_pack(group, step, pack)
                    pack, size = [], 0
                pack.append(item)
                size += item[1].numel()
            self._step_pack(group, step, pack)

    def _step_pack(self, group: dict, step: int, pack: list) -> None:
        beta1, beta2 = group["betas"]
        sizes = [p.numel() for _, p, _ in pack]
        total = sum(sizes)
        buf = _workspace(pack[0][1].device)
        x, g, m, v = (b[:total] for b in buf)
        params = [p.view(-1) for _, p, _ in pack]
        moments = [[st[k].view(-1) for _, _, st in pack] for k in ("exp_avg", "exp_avg_sq")]
        for dst, src in ((x, params), (g, [p.grad.reshape(-1) for _, p, _ in pack]), (m, moments[0]),
                         (v, moments[1])):
            torch._foreach_copy_(list(dst.split(sizes)), src)
        torch._fused_adamw_([x], [g], [m], [v], [], [torch.tensor(float(step), dtype=torch.float32, device=x.device)],
                            lr=float(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], amsgrad=False, maximize=False)
        halves = [_halves(Noise((self.seed, step, index), p.device), p.numel()) for index, p, _ in pack]
        torch._foreach_copy_(moments[0], list(m.split(sizes)))  # round to nearest, as `_step_low`
        for flat, src, k in ((params, x, 0), (moments[1], v, 1)):
            if flat[0].dtype != torch.bfloat16:
                torch._foreach_copy_(flat, list(src.split(sizes)))
                continue
            noise = [h[k] for h in halves]
            noise = np.concatenate(noise) if isinstance(noise[0], np.ndarray) else torch.cat(noise)
            out = torch.empty(total, dtype=torch.bfloat16, device=x.device)
            stochastic_round_(out, src, noise)
            torch._foreach_copy_(flat, list(out.split(sizes)))

    def _step_low(self, group: dict, index: int, p: torch.Tensor) -> None:
        state = self._state(p)
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        noise = Noise((self.seed, step, index), _local(p).device).skip(_flat_offset(p))
        flat_p, flat_g = _local(p).view(-1), _local(p.grad).reshape(-1)
        flat_m, flat_v = _local(state["exp_avg"]).view(-1), _local(state["exp_avg_sq"]).view(-1)
        buf = _workspace(flat_p.device)
        steps = [torch.tensor(float(step), dtype=torch.float32, device=flat_p.device)]
        chunk = blocks.size(flat_p.device)
        for start in range(0, flat_p.numel(), chunk):
            sl = slice(start, start + chunk)
            x, g, m, v = (b[: flat_p[sl].numel()] for b in buf)
            for dst, src in ((x, flat_p), (g, flat_g), (m, flat_m), (v, flat_v)):
                dst.copy_(src[sl])
            # torch's fused AdamW kernel (one pass) on the fp32 chunk, then back to the tensors' dtypes
            torch._fused_adamw_([x], [g], [m], [v], [], steps, lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
            low_half, high_half = _halves(noise, x.numel())
            flat_m[sl].copy_(m)  # the first moment moves 10% of itself a step: round to nearest
            if flat_p.dtype == torch.bfloat16:
                stochastic_round_(flat_p[sl], x, low_half)
            else:  # an fp32 tensor with bf16 moments (`state_dtype`)
                flat_p[sl].copy_(x)
            if flat_v.dtype == torch.bfloat16:
                stochastic_round_(flat_v[sl], v, high_half)
            else:
                flat_v[sl].copy_(v)

"""Checkpoints of a training run: the trainable state, the optimiser, every process's RNG and the
position in the data, in safetensors + JSON under RUN_DIR/checkpoint/step-N/ (``latest.json`` names
the complete one). `read_checkpoint` refuses a checkpoint written with other settings or another
number of processes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import runs
from ..sharding import full
from .._io import atomic_path, atomic_write_text
from ..errors import TrainError
from .config import L0_FORK_FREE_KEYS, RESUME_KEYS, UNRECORDED_SETTINGS, TrainConfig
from .distributed import barrier, is_main


@dataclass
class Position:
    """Where training is: the next (phase, epoch, step) to run, and what was done so far."""

    phase: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    examples: int = 0
    epoch_records: list = dataclasses.field(default_factory=list)
    after_projection: dict | None = None
    peak_memory_bytes: int = 0
    """The main process's peak memory so far (`memory.peak_bytes`), across resumes."""



def trainable_named(model) -> dict[str, torch.Tensor]:
    """The state training changes: DiffModel's own, or every trainable parameter (full / LoRA)."""
    from ..model import DiffModel

    if isinstance(model, DiffModel):
        return model.trainable_state_dict()
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out[name] = p.detach().contiguous()
    return out


@torch.no_grad()
def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    from ..model import DiffModel

    if isinstance(model, DiffModel):
        model.load_trainable_state_dict(state)
        return
    params = dict(model.named_parameters())
    for name, t in state.items():
        params[name].copy_(t)


def restore_trainable(model, ckpt: Path) -> None:
    """The trainable state of checkpoint directory `ckpt` into `model` (--resume, --from-l0)."""
    trainable, _ = load_safetensors(Path(ckpt) / "trainable.safetensors")
    load_trainable(model, trainable)


def state_hash(model) -> str:
    """A hash of the trainable state (positions and values of the diff, head, ...)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(trainable_named(model).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- optimiser state <-> safetensors ----------------------------------------------------------------
def optimizer_to_safetensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{key}"] = full(v).cpu().contiguous()  # gathered when sharded
            else:
                scalars[f"{pid}.{key}"] = v
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    if "in_backward" in sd:
        meta["in_backward"] = sd["in_backward"]
    return tensors, meta


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    out = {"state": state, "param_groups": meta["param_groups"]}
    if "in_backward" in meta:
        out["in_backward"] = meta["in_backward"]
    return out


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"json": json.dumps(metadata or {})})


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise TrainError(f"checkpoint file {path} is unreadable ({e}); restart with --overwrite") from e


# ---- checkpoints ---------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / runs.CHECKPOINT_DIR / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TrainError(f"{pointer} is damaged ({e}); restart with --overwrite") from e
    path = pointer.parent / name
    if not (path / "trainer_state.json").exists():
        raise TrainError(f"{pointer} points to {path}, which is incomplete; restart with --overwrite")
    return path


def write_checkpoint(acc, run_dir: Path, model, optimizer, pos: Position, settings: dict) -> None:
    root = run_dir / runs.CHECKPOINT_DIR
    step_dir = root / f"step-{pos.global_step:09d}"
    if is_main(acc):
        if step_dir.exists():
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True)
    barrier(acc)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _save_safetensors(step_dir / f"rng-rank{acc.process_index}.safetensors", rng)
    if is_main(acc) or getattr(model, "sharded", False):  # sharded: gathering is a collective of every process
        trainable = trainable_named(model)
        opt_tensors, opt_meta = optimizer_to_safetensors(optimizer)
    if is_main(acc):
        _save_safetensors(step_dir / "trainable.safetensors", trainable)
        _save_safetensors(step_dir / "optimizer.safetensors", opt_tensors, opt_meta)
        state = {"position": dataclasses.asdict(pos), "settings": settings, "world_size": acc.num_processes}
        atomic_write_text(step_dir / "trainer_state.json", json.dumps(state, indent=2) + "\n")
    barrier(acc)
    if is_main(acc):
        atomic_write_text(root / "latest.json", json.dumps({"dir": step_dir.name}) + "\n")
        for old in root.glob("step-*"):
            if old != step_dir:
                shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(path: Path, settings: dict, world: int, keys=RESUME_KEYS, hint: str = "") -> dict:
    """The checkpoint's state, refused when it was written with other `keys` settings or process count."""
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    # a key a checkpoint lacks was added later; the run used that key's default of the time
    defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **UNRECORDED_SETTINGS}
    saved = {k: state.get("settings", {}).get(k, defaults.get(k)) for k in keys}
    diffs = [k for k in keys if saved.get(k) != settings.get(k)]
    if diffs:
        k = diffs[0]
        raise TrainError(
            f"the checkpoint in {path.parent} was written with {k}={saved.get(k)!r}, now {k}={settings.get(k)!r}; "
            + (hint or "resume with the same settings, or start over with --overwrite")
        )
    if state.get("world_size") != world:
        raise TrainError(
            f"the checkpoint was written by {state.get('world_size')} process(es), this run has {world}; "
            + ("run with the same number of processes" if hint else "resume with the same number of processes")
        )
    return state


def read_l0_checkpoint(run_dir: Path, settings: dict, world: int) -> tuple[Path, dict]:
    """`--from-l0 RUN_DIR`: the checkpoint RUN_DIR holds at the end of its L0 stage, and its state.

    Refused (before any model loads) when RUN_DIR has no checkpoint, when that checkpoint is not at the
    end of the L0 stage, or when it was trained with other settings than this run's (all but
    `L0_FORK_FREE_KEYS`, which shape only what follows the L0 stage)."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        done = " (it is a finished run: finished runs keep no checkpoint)" if (run_dir / runs.METRICS_FILE).exists() else ""
        raise TrainError(f"--from-l0 {run_dir} holds no checkpoint{done}; train the L0 stage with "
                         "--stop-after l0 --output-dir DIR, then start each budget with --from-l0 DIR")
    keys = tuple(k for k in RESUME_KEYS if k not in L0_FORK_FREE_KEYS)
    state = read_checkpoint(ckpt, settings, world, keys,
                            hint="--from-l0 may change only " + ", ".join(L0_FORK_FREE_KEYS))
    pos = state["position"]
    if (pos["phase"], pos["epoch"], pos["step"]) != (1, 0, 0):
        where = "still in the L0 stage" if pos["phase"] == 0 else "past the L0 stage"
        raise TrainError(f"--from-l0 {run_dir}: its checkpoint is {where} (phase {pos['phase']}, epoch "
                         f"{pos['epoch']}, step {pos['step']}); finish its L0 stage with --resume --stop-after l0")
    return ckpt, state

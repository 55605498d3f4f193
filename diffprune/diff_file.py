"""The sparse diff file format and `SparseDiff`, a diff without a model: load, apply, revert, save.

One safetensors file (``diff.safetensors``) holds, for every diffed tensor with nonzeros,

* ``diff.<name>.positions`` — gaps between consecutive sorted flat positions (the first gap is the
  first position), in the narrowest unsigned type that keeps the file smallest (uint8/16/32);
  a gap that does not fit is written as the type's maximum and its true value is appended to
* ``diff.<name>.jumps`` — int64, in order (absent when empty);
* ``diff.<name>.values`` — the diff values;

and ``head.<name>`` for each densely trained head tensor. The header's metadata holds the
config, the base-model fingerprint, shapes, counts and a checksum of all tensor bytes, so the
file alone is complete. ``diff_config.json`` beside it is the same information for people.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._io import atomic_path, atomic_write_text
from .config import DiffPruningConfig
from .errors import BaseModelMismatchError, ConfigError, DiffFileError
from .fingerprint import model_fingerprint

DIFF_FILE = "diff.safetensors"
CONFIG_FILE = "diff_config.json"
FORMAT = "diffprune.sparse_diff"
FORMAT_VERSION = 1

_POSITION_DTYPES = (torch.uint8, torch.uint16, torch.uint32)
_DTYPE_NAMES = {torch.uint8: "uint8", torch.uint16: "uint16", torch.uint32: "uint32"}


# ---- position encoding -------------------------------------------------------------------
def encode_positions(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique int64 positions -> (gaps in a narrow unsigned dtype, int64 escape values)."""
    positions = positions.to(torch.int64).cpu()
    gaps = torch.diff(positions, prepend=positions.new_zeros(1)) if positions.numel() else positions
    best = None
    for dtype in _POSITION_DTYPES:
        cap = torch.iinfo(dtype).max
        n_escapes = int((gaps >= cap).sum())
        size = gaps.numel() * torch.tensor([], dtype=dtype).element_size() + 8 * n_escapes
        if best is None or size < best[0]:
            best = (size, dtype, cap)
    _, dtype, cap = best
    escaped = gaps >= cap
    jumps = gaps[escaped].clone()
    narrow = torch.where(escaped, torch.full_like(gaps, cap), gaps).to(dtype)
    return narrow, jumps


def decode_positions(narrow: torch.Tensor, jumps: torch.Tensor | None) -> torch.Tensor:
    gaps = narrow.to(torch.int64)
    cap = torch.iinfo(narrow.dtype).max
    escaped = gaps == cap
    n_escapes = int(escaped.sum())
    n_jumps = 0 if jumps is None else jumps.numel()
    if n_escapes != n_jumps:
        raise DiffFileError(f"position stream has {n_escapes} escapes but {n_jumps} jump values")
    if n_jumps:
        gaps[escaped] = jumps.to(torch.int64)
    return torch.cumsum(gaps, 0)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _resolve_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / DIFF_FILE
    if not path.exists():
        raise DiffFileError(
            f"no diff at {path}: expected a directory written by DiffModel.save_pretrained "
            f"(containing {DIFF_FILE}) or the path of a {DIFF_FILE} file"
        )
    return path


@dataclass
class SparseDiff:
    """A task's sparse diff plus its dense head, independent of any model instance."""

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    head: dict[str, torch.Tensor]
    config: DiffPruningConfig
    base_fingerprint: str
    n_diffed: int
    extra: dict = field(default_factory=dict)
    """Free-form JSON metadata (e.g. base model path, task, labels) saved with the diff."""
    _backups: dict = field(default_factory=dict, repr=False)

    # ---- counts ----------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def density(self) -> float:
        return self.nnz / self.n_diffed if self.n_diffed else 0.0

    def encoded_sizes(self) -> dict[str, int]:
        """Bytes of positions, values and head as stored (before the file header)."""
        pos = val = 0
        for name, idx in self.indices.items():
            narrow, jumps = encode_positions(idx)
            pos += narrow.numel() * narrow.element_size() + jumps.numel() * 8
            val += self.values[name].numel() * self.values[name].element_size()
        head = sum(t.numel() * t.element_size() for t in self.head.values())
        return {"positions": pos, "values": val, "head": head}

    def bytes_per_nonzero(self) -> float:
        """Stored bytes per nonzero of the diff (positions + values), head excluded."""
        s = self.encoded_sizes()
        return (s["positions"] + s["values"]) / max(self.nnz, 1)

    def summary(self) -> dict:
        sizes = self.encoded_sizes()
        return {
            "nnz": self.nnz,
            "n_diffed": self.n_diffed,
            "density": self.density,
            "bytes_per_nonzero": self.bytes_per_nonzero(),
            "position_bytes_per_nonzero": sizes["positions"] / max(self.nnz, 1),
            "head_bytes": sizes["head"],
            "head_parameters": sum(t.numel() for t in self.head.values()),
        }

    # ---- model application --------------------------------------------------------------------
    def _params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return dict(model.named_parameters())

    def check_base(self, model: torch.nn.Module) -> None:
        found = model_fingerprint(model, self.config)
        if found != self.base_fingerprint:
            raise BaseModelMismatchError(
                "this diff was trained on a different base model: its fingerprint is "
                f"{self.base_fingerprint}, the model's is {found}. Load the base checkpoint named in "
                f"the diff's metadata ({self.extra.get('base_model', 'unknown')}) in the dtype it was "
                "trained in; if you know the weights are compatible, pass --allow-base-mismatch (command line) "
                "or allow_base_mismatch=True (Python)"
            )

    def _check_layout(self, params: dict) -> None:
        for name, shape in self.shapes.items():
            if name not in params:
                raise BaseModelMismatchError(
                    f"the model has no parameter {name!r} that this diff changes; is it the right architecture?"
                )
            if tuple(params[name].shape) != tuple(shape):
                raise BaseModelMismatchError(
                    f"parameter {name!r} has shape {tuple(params[name].shape)} in the model but {tuple(shape)} "
                    "in the diff"
                )
        for name, t in self.head.items():
            if name not in params:
                raise BaseModelMismatchError(
                    f"the model has no head parameter {name!r}: load the base with the same task head "
                    "class and label count the diff was trained with"
                )
            if params[name].shape != t.shape:
                raise BaseModelMismatchError(
                    f"head parameter {name!r} has shape {tuple(params[name].shape)} in the model but "
                    f"{tuple(t.shape)} in the diff (different number of labels?)"
                )

    @torch.no_grad()
    def apply_(self, model: torch.nn.Module, allow_base_mismatch: bool = False) -> torch.nn.Module:
        """theta += delta in place and set the head tensors; `revert_` undoes it bit-exactly."""
        if id(model) in self._backups:
            raise DiffFileError("this diff is already applied to that model; revert_ it first")
        if not allow_base_mismatch:
            self.check_base(model)
        params = self._params(model)
        self._check_layout(params)
        backup = {}
        for name, idx in self.indices.items():
            flat = params[name].data.view(-1)
            idx = idx.to(flat.device)
            backup[name] = flat[idx].clone()
            flat[idx] = flat[idx] + self.values[name].to(device=flat.device, dtype=flat.dtype)
        for name, t in self.head.items():
            backup["head." + name] = params[name].data.clone()
            params[name].data.copy_(t)
        self._backups[id(model)] = backup
        return model

    @torch.no_grad()
    def revert_(self, model: torch.nn.Module) -> torch.nn.Module:
        """Restore the exact base values saved by `apply_`."""
        backup = self._backups.pop(id(model), None)
        if backup is None:
            raise DiffFileError("this diff is not applied to that model; nothing to revert")
        params = self._params(model)
        for name, idx in self.indices.items():
            params[name].data.view(-1)[idx.to(params[name].device)] = backup[name]
        for name in self.head:
            params[name].data.copy_(backup["head." + name])
        return model

    def dense_delta(self, name: str, dtype=None, device=None) -> torch.Tensor:
        v = self.values[name]
        out = torch.zeros(self.shapes[name], dtype=dtype or v.dtype, device=device or v.device)
        out.view(-1)[self.indices[name].to(out.device)] = v.to(out.dtype).to(out.device)
        return out

    # ---- file IO ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``diff.safetensors`` and ``diff_config.json`` atomically into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        entries = {}
        for name in sorted(self.indices):
            idx = self.indices[name]
            if idx.numel() == 0:
                continue
            narrow, jumps = encode_positions(idx)
            tensors[f"diff.{name}.positions"] = narrow
            if jumps.numel():
                tensors[f"diff.{name}.jumps"] = jumps
            tensors[f"diff.{name}.values"] = self.values[name].detach().cpu().contiguous()
            entries[name] = {
                "shape": list(self.shapes[name]),
                "nnz": int(idx.numel()),
                "position_dtype": _DTYPE_NAMES[narrow.dtype],
            }
        for name, t in self.head.items():
            tensors[f"head.{name}"] = t.detach().cpu().contiguous()
        save_id = uuid.uuid4().hex
        header = {
            "config": self.config.to_dict(),
            "base_fingerprint": self.base_fingerprint,
            "n_diffed": self.n_diffed,
            "tensors": entries,
            "zero_tensors": {n: list(s) for n, s in self.shapes.items() if n not in entries},
            "head": sorted(self.head),
            "extra": self.extra,
            "checksum": _checksum(tensors),
            "save_id": save_id,
        }
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "header": json.dumps(header)}
        with atomic_path(directory / DIFF_FILE) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        stored = os.path.getsize(directory / DIFF_FILE)
        readable = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "save_id": save_id,
            "base_fingerprint": self.base_fingerprint,
            **self.summary(),
            "stored_bytes": stored,
            "config": self.config.to_dict(),
            **({"extra": self.extra} if self.extra else {}),
        }
        atomic_write_text(directory / CONFIG_FILE, json.dumps(readable, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, path: str | Path) -> "SparseDiff":
        """Read a diff written by `save` (a directory or its ``diff.safetensors``). Never unpickles."""
        file = _resolve_file(path)
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise DiffFileError(f"{file} is truncated or corrupted ({e}); save the diff again") from e
        if meta.get("format") != FORMAT:
            raise DiffFileError(f"{file} is a safetensors file but not a diffprune sparse diff (no format tag)")
        if int(meta.get("format_version", "0")) > FORMAT_VERSION:
            raise DiffFileError(
                f"{file} uses format version {meta['format_version']}; this diffprune reads up to "
                f"{FORMAT_VERSION}: upgrade diffprune"
            )
        try:
            header = json.loads(meta["header"])
            config = DiffPruningConfig.from_dict(header["config"])
            fp, n_diffed, entries = header["base_fingerprint"], int(header["n_diffed"]), header["tensors"]
            head_names = header["head"]
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise DiffFileError(f"{file} has an unreadable or incomplete header (missing {e}); save the diff again") from e
        except ConfigError as e:
            raise DiffFileError(f"{file}: bad config in header: {e}") from e
        if _checksum(tensors) != header.get("checksum"):
            raise DiffFileError(f"{file} is corrupted: its tensor bytes do not match the stored checksum")
        indices, values, shapes = {}, {}, {}
        for name, e in entries.items():
            try:
                narrow = tensors[f"diff.{name}.positions"]
                vals = tensors[f"diff.{name}.values"]
            except KeyError as missing:
                raise DiffFileError(f"{file} lacks tensor {missing} listed in its header") from None
            idx = decode_positions(narrow, tensors.get(f"diff.{name}.jumps"))
            numel = 1
            for d in e["shape"]:
                numel *= d
            if idx.numel() != e["nnz"] or vals.numel() != e["nnz"] or (idx.numel() and idx[-1] >= numel):
                raise DiffFileError(f"{file}: tensor {name!r} has inconsistent positions/values/shape")
            indices[name], values[name], shapes[name] = idx, vals, tuple(e["shape"])
        for name, shape in header.get("zero_tensors", {}).items():
            indices[name] = torch.zeros(0, dtype=torch.int64)
            values[name] = torch.zeros(0)
            shapes[name] = tuple(shape)
        try:
            head = {n: tensors[f"head.{n}"] for n in head_names}
        except KeyError as missing:
            raise DiffFileError(f"{file} lacks head tensor {missing} listed in its header") from None
        readable = file.parent / CONFIG_FILE
        if readable.exists():
            try:
                side = json.loads(readable.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DiffFileError(f"{readable} is not valid JSON ({e})") from e
            if side.get("save_id") != header.get("save_id"):
                raise DiffFileError(
                    f"{readable} and {file.name} come from different saves (an interrupted save?); "
                    "save the diff again"
                )
        return cls(indices, values, shapes, head, config, fp, n_diffed, header.get("extra") or {})

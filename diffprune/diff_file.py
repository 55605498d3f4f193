"""The sparse diff file format and `SparseDiff`, a diff without a model: load, apply, revert, save.

One safetensors file (``diff.safetensors``) whose metadata holds ``format``
(``"diffprune.sparse_diff"``), ``format_version`` and ``header`` (JSON: config, base-model
fingerprint, shapes, counts, codecs, value dtype, extra metadata, save id and a checksum), so the
file alone is complete. ``diff_config.json`` beside it is the same information for people.

Format version 3 (written today) stores exactly the coded streams of version 2 below, packed: every
stream of every tensor, in the order of the per-tensor table, in one uint8 tensor ``streams``; the
table (``tensors`` and ``zero_tensors`` of the v2 header, each tensor with its streams' names, dtypes
and lengths) as compact JSON compressed with zlib in the uint8 tensor ``index``; ``head.<name>`` as
in v2. The metadata ``header`` keeps the rest (config, fingerprint, labels, value dtype, checksum).
So a diff of a hundred tensors is four safetensors entries and a ~1.5 kB header instead of ~440
entries and ~75 kB: on a 0.5% MiniLM diff the file shrinks by ~70 kB (279 -> 213 kB in int8), at
0.05% by more than half. The checksum covers the metadata header and the three kinds of tensors.

Format version 2 (still read; the streams v3 packs). For every diffed tensor with k > 0 nonzeros
(tensors with none are only listed, under ``zero_tensors``):

* positions, coded as the header entry's ``positions`` says (`diffprune.codec`): ``"rice"`` —
  Golomb-Rice coded gaps, ``diff.<name>.pos_low`` (uint8: the R low bits of every gap, packed) and
  ``diff.<name>.pos_high`` (uint8: the quotients in unary, ``bits`` bits); ``"rice_complement"`` —
  the same over the zero positions, for dense tensors; ``"bitmap"`` — ``diff.<name>.pos_bitmap``
  (uint8, n bits); ``"all"`` — nothing. Whichever is smallest is written; for a random 0.5% mask
  "rice" takes about log2 C(n, k) / k + 0.03 bits per nonzero.
* the values, rounded to the header's ``value_dtype`` (fp32, bf16, fp16, or int8 with
  ``diff.<name>.scales``: float32, one symmetric absmax scale per ``value_block`` values) and
  stored losslessly as the entry's ``values`` says: ``"raw"`` — ``diff.<name>.values`` in that
  dtype; ``"exp_rice"`` (floats) — sign and mantissa bits packed in ``diff.<name>.val_sm``, the
  exponents (minus a reference ``eref``, zigzagged) Golomb-Rice coded in ``val_exp_low`` /
  ``val_exp_high`` (a diff's values span few exponents: ~3.4 bits instead of 8); ``"zigzag_rice"``
  (int8) — the integers Golomb-Rice coded in ``val_low`` / ``val_high``. The smallest is written.
  Values are dequantised to float32 on load, so everything downstream sees float32.

and ``head.<name>`` (dense, as trained) for each head tensor. The v2 checksum
(`header_checksum`) is a blake2b of the format tag, the version, the canonical JSON of the whole
header (every field but ``checksum``) and every tensor's name, dtype, shape and bytes: editing any
of them (a label name, a shape, a scale) makes the file refuse to load.

Format version 1 (still read): ``diff.<name>.positions`` — gaps between sorted positions in
uint8/16/32, escaped gaps in ``diff.<name>.jumps`` (int64) — and fp32 ``diff.<name>.values``. Its
checksum covers only the tensor names and bytes (not the header); v1 files keep loading with it.

Loading never allocates more than the file's own tensors justify: counts and shapes in the
header are checked against the stored byte arrays' sizes before anything is decoded, and any
malformed input raises `DiffFileError` (or `BaseModelMismatchError` when applied to the wrong
model).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import codec
from ._io import atomic_path, atomic_write_text
from .config import DiffPruningConfig
from .errors import BaseModelMismatchError, ConfigError, DiffFileError
from .fingerprint import model_fingerprint

DIFF_FILE = "diff.safetensors"
CONFIG_FILE = "diff_config.json"
FORMAT = "diffprune.sparse_diff"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

_POSITION_DTYPES = (torch.uint8, torch.uint16, torch.uint32)
_DTYPE_NAMES = {torch.uint8: "uint8", torch.uint16: "uint16", torch.uint32: "uint32"}
_POSITION_SUFFIX = {"low": "pos_low", "high": "pos_high", "bitmap": "pos_bitmap"}
_MALFORMED = (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError, RuntimeError,
              AssertionError, ZeroDivisionError, codec.CodecError)


# ---- version 1 position encoding (read, and written only by `_save_v1` for tests / benchmarks) ---
def encode_positions(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v1: sorted unique int64 positions -> (gaps in a narrow unsigned dtype, int64 escape values)."""
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
    """v1: the inverse of `encode_positions`."""
    if narrow.dtype not in _POSITION_DTYPES or narrow.dim() != 1:
        raise DiffFileError(f"v1 position stream has dtype {narrow.dtype} and shape {tuple(narrow.shape)}")
    gaps = narrow.to(torch.int64)
    cap = torch.iinfo(narrow.dtype).max
    escaped = gaps == cap
    n_escapes = int(escaped.sum())
    n_jumps = 0 if jumps is None else jumps.numel()
    if n_escapes != n_jumps:
        raise DiffFileError(f"position stream has {n_escapes} escapes but {n_jumps} jump values")
    if n_jumps:
        if jumps.dtype != torch.int64 or jumps.dim() != 1 or bool((jumps < 0).any()) or bool((jumps >= 2**48).any()):
            raise DiffFileError("v1 jump values are malformed")
        gaps[escaped] = jumps
    return torch.cumsum(gaps, 0)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """v1 checksum: tensor names and bytes only."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if not t.numel():
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def header_checksum(header: dict, tensors: Mapping[str, torch.Tensor], format: str = FORMAT,
                    version: int | str = FORMAT_VERSION) -> str:
    """The v2 checksum: blake2b over the format tag, the version, the canonical JSON of `header`
    without its ``checksum`` key, and each tensor's name, dtype, shape and bytes (sorted by name).

    Use it to re-checksum a deliberately edited file (tests, fuzzers)."""
    body = {k: v for k, v in header.items() if k != "checksum"}
    h = hashlib.blake2b(digest_size=16)
    for part in (str(format), str(version), json.dumps(body, sort_keys=True, separators=(",", ":"))):
        h.update(part.encode())
        h.update(b"\0")
    for key in sorted(tensors):
        t = tensors[key]
        h.update(json.dumps([key, str(t.dtype), list(t.shape)], separators=(",", ":")).encode())
        h.update(b"\0")
        h.update(_tensor_bytes(t))
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


# ---- lazily decoded positions -----------------------------------------------------------------
# ---- version 3: the v2 streams packed into one tensor, the per-tensor table compressed ------------
_STREAM_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16,
                  # only in edited files: packed as stored so that the load refuses them by name
                  "float64": torch.float64, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}
_STREAM_NAMES = {v: k for k, v in _STREAM_DTYPES.items()}
_MAX_INDEX_BYTES = 16 * 2**20  # the decompressed per-tensor table (a real one: ~200 bytes per tensor)


def _pack(header: dict, named: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the file's header, the file's tensors) of a v3 file, from the v2 layout: `header` with its
    ``tensors`` / ``zero_tensors`` table and `named` = ``diff.<name>.<stream>`` and ``head.<name>``
    tensors. Every stream goes, in the table's order, into one uint8 tensor ``streams``; the table,
    with each tensor's streams (stream, dtype, count) in that order, is compact JSON compressed with
    zlib in the uint8 tensor ``index``. So a file of a hundred diffed tensors has four safetensors
    entries instead of ~440, and its header is ~2 kB instead of ~75 kB (v2)."""
    table = {"tensors": {}, "zero_tensors": header["zero_tensors"]}
    blob, used = [], set()
    for name, entry in header["tensors"].items():
        streams = []
        prefix = f"diff.{name}."
        for key in sorted(k[len(prefix):] for k in named if k.startswith(prefix) and "." not in k[len(prefix):]):
            t = named[prefix + key].detach().cpu().contiguous().reshape(-1)
            streams.append([key, _STREAM_NAMES[t.dtype], t.numel()])
            blob.append(t.view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8))
            used.add(prefix + key)
        table["tensors"][name] = {**entry, "streams": streams}
    tensors = {k: v for k, v in named.items() if k.startswith("head.")}
    if set(named) - used - set(tensors):
        raise DiffFileError(f"tensors outside the header's table: {sorted(set(named) - used - set(tensors))[:3]}")
    tensors["streams"] = torch.cat(blob) if blob else torch.zeros(0, dtype=torch.uint8)
    raw = json.dumps(table, separators=(",", ":")).encode()
    tensors["index"] = torch.frombuffer(bytearray(zlib.compress(raw, 9)), dtype=torch.uint8)
    file_header = {k: v for k, v in header.items() if k not in ("tensors", "zero_tensors")}
    return file_header, tensors


def _unpack(file: Path, header: dict, tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The inverse of `_pack`: (the header with its table, the v2-layout tensors), every size checked
    against the stored bytes before anything is cut out of them."""
    index, streams = tensors.get("index"), tensors.get("streams")
    for key, t in (("index", index), ("streams", streams)):
        if t is None or t.dtype != torch.uint8 or t.dim() != 1:
            raise DiffFileError(f"{file} lacks its uint8 {key!r} tensor (format v3)")
    extra = set(tensors) - {"index", "streams"} - {k for k in tensors if k.startswith("head.")}
    if extra:
        raise DiffFileError(f"{file} holds tensors its header does not list: {sorted(extra)[:3]}")
    try:
        z = zlib.decompressobj()
        raw = z.decompress(index.numpy().tobytes(), _MAX_INDEX_BYTES)
        if z.unconsumed_tail or not z.eof:
            raise DiffFileError(f"{file}: its index is cut short or larger than {_MAX_INDEX_BYTES} bytes")
        table = json.loads(raw)
    except (zlib.error, ValueError, RecursionError) as e:
        raise DiffFileError(f"{file} has an unreadable index ({e}); save the diff again") from None
    if not isinstance(table, dict) or not isinstance(table.get("tensors"), dict):
        raise DiffFileError(f"{file}: its index is not a table of tensors")
    named = {k: t for k, t in tensors.items() if k.startswith("head.")}
    entries, offset, total = {}, 0, streams.numel()
    for name, entry in table["tensors"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("streams"), list):
            raise DiffFileError(f"{file}: tensor {name!r} has no list of streams in the index")
        for item in entry["streams"]:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and item[1] in _STREAM_DTYPES and _is_int(item[2]) and item[2] >= 0):
                raise DiffFileError(f"{file}: tensor {name!r} has a malformed stream {item!r}")
            key, dtype, count = item[0], _STREAM_DTYPES[item[1]], item[2]
            size = count * torch.empty(0, dtype=dtype).element_size()
            if offset + size > total:
                raise DiffFileError(f"{file}: the streams of tensor {name!r} run past the stored bytes")
            named[f"diff.{name}.{key}"] = streams[offset:offset + size].clone().view(dtype)
            offset += size
        entries[name] = {k: v for k, v in entry.items() if k != "streams"}
    if offset != total:
        raise DiffFileError(f"{file}: {total - offset} stored stream bytes belong to no tensor")
    return {**header, "tensors": entries, "zero_tensors": table.get("zero_tensors", {})}, named


def read_layout(path: str | Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(safetensors metadata, the diffprune header with its per-tensor table, the tensors in the
    per-tensor layout of v2: ``diff.<name>.<stream>``, ``head.<name>``) of a diff file, a v3 file
    unpacked. For tests and fuzzers that edit a file field by field; `write_layout` writes it back."""
    file = _resolve_file(path)
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["header"])
    if str(meta.get("format_version")) == "3":
        header, tensors = _unpack(file, header, tensors)
    return meta, header, tensors


def write_layout(path: str | Path, meta: dict, header: dict, named: Mapping[str, torch.Tensor],
                 rechecksum: bool = True) -> Path:
    """Write a diff file from `read_layout`'s parts, packed again when ``meta["format_version"]`` is 3, with
    a fresh checksum (unless `rechecksum` is false: the header's own is kept). Tensors the header's table
    does not name are written as entries of their own (an edit the reader must refuse)."""
    file = Path(path) / DIFF_FILE if Path(path).is_dir() or not str(path).endswith(".safetensors") else Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    version = str(meta.get("format_version", "1"))
    header, tensors = dict(header), dict(named)
    if version == "3":
        table = header.get("tensors")
        if isinstance(table, dict):
            listed = {k for k in tensors if k.startswith("diff.") and k[5:].rsplit(".", 1)[0] in table}
            foreign = {k: v for k, v in tensors.items() if k not in listed and not k.startswith("head.")}
            header, tensors = _pack(header, {k: v for k, v in tensors.items() if k not in foreign})
            tensors.update(foreign)
        else:  # a malformed table goes into the index as it is, for the reader to refuse
            raw = json.dumps({"tensors": table, "zero_tensors": header.get("zero_tensors")}).encode()
            tensors = {k: v for k, v in tensors.items() if k.startswith("head.")}
            tensors["streams"] = torch.zeros(0, dtype=torch.uint8)
            tensors["index"] = torch.frombuffer(bytearray(zlib.compress(raw)), dtype=torch.uint8)
            header = {k: v for k, v in header.items() if k not in ("tensors", "zero_tensors")}
    if rechecksum:
        header["checksum"] = (_checksum(tensors) if version == "1" else
                              header_checksum(header, tensors, meta.get("format", FORMAT), version))
    save_file(tensors, str(file), metadata={**meta, "header": json.dumps(header)})
    return file


class CodedPositions:
    """The coded positions of one tensor; `decode()` gives them as int64 (validated)."""

    __slots__ = ("entry", "arrays", "n", "k")

    def __init__(self, entry: dict, arrays: dict[str, np.ndarray], n: int, k: int):
        self.entry, self.arrays, self.n, self.k = entry, arrays, n, k

    def decode(self) -> torch.Tensor:
        """int64 positions (the arrays were validated by a full decode when the file was loaded)."""
        try:
            return torch.from_numpy(codec.decode_positions(self.entry, self.arrays, self.n, self.k, trusted=True))
        except codec.CodecError as e:
            raise DiffFileError(f"malformed positions: {e}") from None

    def nbytes(self) -> int:
        return codec.position_bytes(self.arrays)


class PositionMap(Mapping):
    """name -> int64 positions, decoded from the file on each access (one tensor at a time), so a
    loaded diff holds its positions in their coded size (about 1.2 bytes per nonzero) rather than
    8 bytes. Entries may also be plain tensors."""

    def __init__(self, items: Mapping | None = None):
        self._items: dict = dict(items or {})
        self._decoded: dict[str, torch.Tensor] | None = None  # int64 positions, when keeping them

    def keep_decoded(self, on: bool = True) -> None:
        """Keep each tensor's positions as int64 once decoded (8 bytes per nonzero more in memory: int32
        would halve that, but numpy converts int32 indices on every gather and scatter, which cost 1.35x
        v1's apply time), so later applies and reverts skip decoding; off drops them."""
        self._decoded = {} if on else None

    def _remember(self, name: str, pos: torch.Tensor) -> torch.Tensor:
        if self._decoded is not None and isinstance(self._items[name], CodedPositions):
            self._decoded[name] = pos
        return pos

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._decoded is not None and name in self._decoded:
            return self._decoded[name]
        v = self._items[name]
        return self._remember(name, v.decode()) if isinstance(v, CodedPositions) else v

    def __setitem__(self, name: str, value) -> None:
        self._items[name] = value

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def iter_decoded(self, names=None, budget: int | None = None):
        """(name, int64 positions) for `names` (default: all), decoding the small "rice" coded
        tensors in batches of at most `budget` positions (default: the largest tensor's count, at
        least 65536), so memory stays O(largest tensor's nonzeros) and per-call overhead is paid
        once per batch rather than per tensor. The order may differ from `names`."""
        names = list(self._items) if names is None else list(names)
        groups: dict[int, list[str]] = {}
        for name in names:
            v = self._items[name]
            if self._decoded is not None and name in self._decoded:
                yield name, self._decoded[name]
            elif isinstance(v, CodedPositions) and v.entry.get("codec") == "rice":
                groups.setdefault(v.entry["r"], []).append(name)
            else:
                yield name, self[name]
        if budget is None:
            budget = max([65536] + [self._items[n].k for g in groups.values() for n in g])
        for r, group in groups.items():
            batch, size = [], 0
            for name in group + [None]:
                k = self._items[name].k if name is not None else 0
                if batch and (name is None or size + k > budget):
                    streams = [(self._items[b].arrays["low"], self._items[b].arrays["high"], self._items[b].k)
                               for b in batch]
                    try:
                        decoded = codec.decode_rice_batch(streams, r)
                    except codec.CodecError as e:
                        raise DiffFileError(f"malformed positions: {e}") from None
                    for b, pos in zip(batch, decoded):
                        yield b, self._remember(b, torch.from_numpy(pos))
                    batch, size = [], 0
                if name is not None:
                    batch.append(name)
                    size += k

    def coded(self, name: str) -> CodedPositions | None:
        v = self._items[name]
        return v if isinstance(v, CodedPositions) else None

    def count(self, name: str) -> int:
        v = self._items[name]
        return v.k if isinstance(v, CodedPositions) else int(v.numel())

    def __repr__(self) -> str:
        return f"PositionMap({ {n: self.count(n) for n in self._items} } nonzeros)"


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape) if len(shape) else 1


@dataclass
class SparseDiff:
    """A task's sparse diff plus its dense head, independent of any model instance.

    ``indices[name]`` are sorted flat int64 positions (decoded on access for a loaded v2 file),
    ``values[name]`` float32 values (dequantised on load)."""

    indices: Mapping[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    head: dict[str, torch.Tensor]
    config: DiffPruningConfig
    base_fingerprint: str
    n_diffed: int
    extra: dict = field(default_factory=dict)
    """Free-form JSON metadata (e.g. base model path, task, labels) saved with the diff."""
    value_dtype: str = "fp32"
    """How `save` stores the values unless told otherwise (a loaded diff: how its file stores them)."""
    format_version: int | None = None
    """The file version a loaded diff was read from (None: built in memory)."""
    _backups: dict = field(default_factory=dict, repr=False)

    # ---- counts ----------------------------------------------------------------------------
    def nnz_of(self, name: str) -> int:
        """Nonzeros of one tensor, without decoding its positions."""
        if isinstance(self.indices, PositionMap):
            return self.indices.count(name)
        return int(self.indices[name].numel())

    @property
    def nnz(self) -> int:
        return sum(self.nnz_of(n) for n in self.indices)

    @property
    def density(self) -> float:
        return self.nnz / self.n_diffed if self.n_diffed else 0.0

    def _coded(self, name: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(position entry, arrays) of one tensor: reused from the file if loaded from v2, else encoded."""
        c = self.indices.coded(name) if isinstance(self.indices, PositionMap) else None
        if c is not None:
            return c.entry, c.arrays
        idx = self.indices[name].detach().to(device="cpu", dtype=torch.int64).numpy()
        return codec.encode_positions(idx, _numel(self.shapes[name]))

    def encoded_sizes(self, value_dtype: str | None = None) -> dict[str, int]:
        """Bytes of positions, values and head as `save` would store them in format v2 (before
        the file header), with the values in `value_dtype` (default: `self.value_dtype`)."""
        vd = codec.normalize_value_dtype(value_dtype or self.value_dtype)
        pos = val = 0
        for name in self.indices:
            k = self.nnz_of(name)
            if k == 0:
                continue
            _, arrays = self._coded(name)
            pos += codec.position_bytes(arrays)
            _, stored = codec.encode_values(self.values[name], vd)
            val += codec.value_bytes(stored)
        head = sum(t.numel() * t.element_size() for t in self.head.values())
        return {"positions": pos, "values": val, "head": head}

    def bytes_per_nonzero(self, value_dtype: str | None = None) -> float:
        """Stored bytes per nonzero of the diff (positions + values), head excluded."""
        s = self.encoded_sizes(value_dtype)
        return (s["positions"] + s["values"]) / max(self.nnz, 1)

    def position_bound_bits(self) -> float:
        """sum over tensors of log2 C(n_t, k_t): the fewest bits any code can name the positions in."""
        return sum(codec.position_bound_bits(_numel(self.shapes[n]), self.nnz_of(n)) for n in self.indices)

    def summary(self, value_dtype: str | None = None, sizes: dict[str, int] | None = None) -> dict:
        """Counts, bytes and bits per nonzero as the diff file (v2 and v3 code alike) stores the diff with `value_dtype`
        (`sizes`: `encoded_sizes(value_dtype)` when the caller has them already)."""
        vd = codec.normalize_value_dtype(value_dtype or self.value_dtype)
        sizes = sizes if sizes is not None else self.encoded_sizes(vd)
        nnz = max(self.nnz, 1)
        return {
            "nnz": self.nnz,
            "n_diffed": self.n_diffed,
            "density": self.density,
            "bytes_per_nonzero": (sizes["positions"] + sizes["values"]) / nnz,
            "position_bytes_per_nonzero": sizes["positions"] / nnz,
            "position_bytes": sizes["positions"],
            "value_bytes": sizes["values"],
            "head_bytes": sizes["head"],
            "head_parameters": sum(t.numel() for t in self.head.values()),
            "format_version": self.format_version or FORMAT_VERSION,
            "value_dtype": vd,
            "value_width_bits": codec.VALUE_BITS[vd],
            "bits_per_nonzero": 8 * (sizes["positions"] + sizes["values"]) / nnz,
            "position_bits_per_nonzero": 8 * sizes["positions"] / nnz,
            "position_bound_bits_per_nonzero": self.position_bound_bits() / nnz,
            "value_bits_per_nonzero": 8 * sizes["values"] / nnz,
        }

    # ---- model application (`diffprune.apply` does the work) ----------------------------------
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
        from . import apply as engine

        if id(model) in self._backups:
            raise DiffFileError("this diff is already applied to that model; revert_ it first")
        if not allow_base_mismatch:
            self.check_base(model)
        params = self._params(model)
        self._check_layout(params)
        self._backups[id(model)] = engine.apply_diff_(params, self)
        return model

    def keep_decoded_positions(self, on: bool = True) -> "SparseDiff":
        """Keep the positions of a loaded v2/v3 file as int64 once the first apply has decoded them, as a
        v1 file holds them: later applies and reverts skip decoding (v1's apply time) at 8 bytes per
        nonzero more in memory (908 kB for MiniLM at 0.5%, against ~1.2 bytes coded). For a few diffs
        switched often; off by default."""
        if isinstance(self.indices, PositionMap):
            self.indices.keep_decoded(on)
        return self

    @torch.no_grad()
    def revert_(self, model: torch.nn.Module) -> torch.nn.Module:
        """Restore the exact base values saved by `apply_`."""
        from . import apply as engine

        backup = self._backups.pop(id(model), None)
        if backup is None:
            raise DiffFileError("this diff is not applied to that model; nothing to revert")
        engine.revert_diff_(self._params(model), self, backup)
        return model

    # ---- file IO ----------------------------------------------------------------------------------
    def _tensors_v2(self, value_dtype: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, int]]:
        """(the file's tensors, its per-tensor header entries, `encoded_sizes` of them)."""
        tensors: dict[str, torch.Tensor] = {}
        entries = {}
        sizes = {"positions": 0, "values": 0, "head": 0}
        for name in sorted(self.indices):
            k = self.nnz_of(name)
            if k == 0:
                continue
            n = _numel(self.shapes[name])
            c = self.indices.coded(name) if isinstance(self.indices, PositionMap) else None
            vals = self.values[name].detach().to(device="cpu", dtype=torch.float32).reshape(-1)
            if vals.numel() != k:
                raise DiffFileError(f"tensor {name!r} has {k} positions but {vals.numel()} values")
            if c is not None:
                entry, arrays = c.entry, c.arrays
            else:
                idx = self.indices[name].detach().to(device="cpu", dtype=torch.int64).reshape(-1)
                if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
                    order = torch.argsort(idx)
                    idx, vals = idx[order], vals[order]
                    if not bool((idx[1:] > idx[:-1]).all()):
                        raise DiffFileError(f"tensor {name!r} has repeated positions")
                if int(idx[0]) < 0 or int(idx[-1]) >= n:
                    raise DiffFileError(f"tensor {name!r} has positions outside its shape {tuple(self.shapes[name])}")
                entry, arrays = codec.encode_positions(idx.numpy(), n)
            for key, arr in arrays.items():
                tensors[f"diff.{name}.{_POSITION_SUFFIX[key]}"] = torch.from_numpy(np.ascontiguousarray(arr))
            try:
                ventry, stored = codec.encode_values(vals, value_dtype)
            except ValueError as e:
                raise DiffFileError(f"tensor {name!r}: {e}") from None
            for key, t in stored.items():
                tensors[f"diff.{name}.{key}"] = t
            sizes["positions"] += codec.position_bytes(arrays)
            sizes["values"] += codec.value_bytes(stored)
            entries[name] = {"shape": [int(d) for d in self.shapes[name]], "nnz": k, "positions": dict(entry),
                             "values": ventry}
        for name, t in self.head.items():
            tensors[f"head.{name}"] = t.detach().cpu().contiguous()
            sizes["head"] += t.numel() * t.element_size()
        return tensors, entries, sizes

    def save(self, directory: str | Path, value_dtype: str | None = None) -> Path:
        """Write ``diff.safetensors`` (format v3) and ``diff_config.json`` atomically into `directory`.

        `value_dtype`: "fp32" (exact), "bf16", "fp16" or "int8" (per-block absmax scales); default:
        `self.value_dtype` (fp32 for a diff made in memory)."""
        return self._save(directory, value_dtype, FORMAT_VERSION)

    def _save_v2(self, directory: str | Path, value_dtype: str | None = None) -> Path:
        """Write format version 2 (one safetensors entry per stream): tests and benchmarks only."""
        return self._save(directory, value_dtype, 2)

    def _save(self, directory: str | Path, value_dtype: str | None, version: int) -> Path:
        try:
            vd = codec.normalize_value_dtype(value_dtype or self.value_dtype)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, entries, sizes = self._tensors_v2(vd)
        save_id = uuid.uuid4().hex
        header = {
            "config": self.config.to_dict(),
            "base_fingerprint": self.base_fingerprint,
            "n_diffed": int(self.n_diffed),
            "tensors": entries,
            "zero_tensors": {n: [int(d) for d in s] for n, s in self.shapes.items() if n not in entries},
            "head": sorted(self.head),
            "extra": self.extra,
            "value_dtype": vd,
            "value_block": codec.INT8_BLOCK,
            "save_id": save_id,
        }
        if version == 3:
            header, tensors = _pack(header, tensors)
        header["checksum"] = header_checksum(header, tensors, FORMAT, version)
        metadata = {"format": FORMAT, "format_version": str(version), "header": json.dumps(header)}
        with atomic_path(directory / DIFF_FILE) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        self.value_dtype = vd  # sizes and summaries now describe the file just written
        stored = os.path.getsize(directory / DIFF_FILE)
        summary = self.summary(vd, sizes)  # the sizes of what was just written, not a second encoding
        summary["format_version"] = version
        summary["file_bytes"] = stored
        readable = {
            "format": FORMAT,
            "format_version": version,
            "save_id": save_id,
            "base_fingerprint": self.base_fingerprint,
            **summary,
            "stored_bytes": stored,
            "config": self.config.to_dict(),
            **({"extra": self.extra} if self.extra else {}),
        }
        atomic_write_text(directory / CONFIG_FILE, json.dumps(readable, indent=2) + "\n")
        return directory

    def _save_v1(self, directory: str | Path) -> Path:
        """Write the old format version 1 (fp32 values, gap-coded positions): tests and benchmarks only."""
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
            tensors[f"diff.{name}.values"] = self.values[name].detach().cpu().float().contiguous()
            entries[name] = {"shape": list(self.shapes[name]), "nnz": int(idx.numel()),
                             "position_dtype": _DTYPE_NAMES[narrow.dtype]}
        for name, t in self.head.items():
            tensors[f"head.{name}"] = t.detach().cpu().contiguous()
        header = {"config": self.config.to_dict(), "base_fingerprint": self.base_fingerprint, "n_diffed": self.n_diffed,
                  "tensors": entries, "zero_tensors": {n: list(s) for n, s in self.shapes.items() if n not in entries},
                  "head": sorted(self.head), "extra": self.extra, "checksum": _checksum(tensors),
                  "save_id": uuid.uuid4().hex}
        save_file(tensors, str(directory / DIFF_FILE),
                  metadata={"format": FORMAT, "format_version": "1", "header": json.dumps(header)})
        return directory

    @classmethod
    def load(cls, path: str | Path) -> "SparseDiff":
        """Read a diff written by `save` (a directory or its ``diff.safetensors``). Never unpickles.

        Reads format versions 1, 2 and 3; raises `DiffFileError` on anything malformed."""
        file = _resolve_file(path)
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # SafetensorError, and whatever a damaged header makes the reader raise
            raise DiffFileError(f"{file} is truncated or corrupted ({e}); save the diff again") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DiffFileError(f"{file} is a safetensors file but not a diffprune sparse diff (no format tag)")
        try:
            version = int(meta.get("format_version", "0"))
        except (TypeError, ValueError):
            raise DiffFileError(f"{file} has an unreadable format version {meta.get('format_version')!r}") from None
        if version > FORMAT_VERSION:
            raise DiffFileError(
                f"{file} uses format version {version}; this diffprune reads up to {FORMAT_VERSION}: upgrade diffprune"
            )
        if version not in READABLE_VERSIONS:
            raise DiffFileError(f"{file} has format version {version}, which never existed")
        try:
            header = json.loads(meta["header"])
            if not isinstance(header, dict):
                raise TypeError("the header is not a JSON object")
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise DiffFileError(f"{file} has an unreadable or incomplete header ({e}); save the diff again") from e
        if version >= 2:
            try:
                expected = header_checksum(header, tensors, meta["format"], meta["format_version"])
            except (TypeError, ValueError, RecursionError) as e:
                raise DiffFileError(f"{file} has an unreadable header ({e}); save the diff again") from e
            if header.get("checksum") != expected:
                raise DiffFileError(f"{file} is corrupted: its header or tensor bytes do not match the stored checksum")
        elif _checksum(tensors) != header.get("checksum"):
            raise DiffFileError(f"{file} is corrupted: its tensor bytes do not match the stored checksum")
        try:
            if version == 3:
                header, tensors = _unpack(file, header, tensors)
            diff = (cls._parse_v2 if version >= 2 else cls._parse_v1)(file, header, tensors)
        except DiffFileError:
            raise
        except ConfigError as e:
            raise DiffFileError(f"{file}: bad config in header: {e}") from e
        except _MALFORMED as e:
            raise DiffFileError(f"{file} has a malformed header or tensors ({type(e).__name__}: {e}); "
                                "save the diff again") from e
        diff.format_version = version
        readable = file.parent / CONFIG_FILE
        if readable.exists():
            try:
                side = json.loads(readable.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
                raise DiffFileError(f"{readable} is not valid JSON ({e})") from e
            if not isinstance(side, dict) or side.get("save_id") != header.get("save_id"):
                raise DiffFileError(
                    f"{readable} and {file.name} come from different saves (an interrupted save?); "
                    "save the diff again"
                )
        return diff

    # ---- parsing ----------------------------------------------------------------------------------
    @staticmethod
    def _common(file: Path, header: dict, tensors: dict) -> dict:
        config = DiffPruningConfig.from_dict(header["config"])
        fp, n_diffed, entries = header["base_fingerprint"], header["n_diffed"], header["tensors"]
        head_names, extra = header["head"], header.get("extra") or {}
        zero = header.get("zero_tensors", {})
        if not isinstance(fp, str) or not _is_int(n_diffed) or n_diffed < 0:
            raise DiffFileError(f"{file}: bad base_fingerprint or n_diffed in header")
        if not isinstance(entries, dict) or not isinstance(zero, dict) or not isinstance(extra, dict):
            raise DiffFileError(f"{file}: 'tensors', 'zero_tensors' and 'extra' must be JSON objects")
        if not isinstance(head_names, list) or not all(isinstance(n, str) for n in head_names):
            raise DiffFileError(f"{file}: 'head' must be a list of names")
        if set(entries) & set(zero):
            raise DiffFileError(f"{file}: tensors listed both with and without nonzeros")
        head = {}
        for n in head_names:
            t = tensors.get(f"head.{n}")
            if t is None:
                raise DiffFileError(f"{file} lacks head tensor 'head.{n}' listed in its header")
            head[n] = t
        shapes = {}
        for name, shape in list(entries.items()) + list(zero.items()):
            if isinstance(shape, dict):
                shape = shape.get("shape")
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise DiffFileError(f"{file}: tensor {name!r} has a bad shape {shape!r}")
            if _numel(shape) > codec.MAX_ENTRIES:
                raise DiffFileError(f"{file}: tensor {name!r} claims {_numel(shape)} entries (at most "
                                    f"{codec.MAX_ENTRIES} supported)")
            shapes[name] = tuple(shape)
        # the config must diff exactly these tensors, or no model could take the diff
        not_diffed = [n for n in shapes if config.role_of(n) != "diff"]
        if not_diffed or set(shapes) & set(head):
            bad = (not_diffed or sorted(set(shapes) & set(head)))[0]
            raise DiffFileError(f"{file}: tensor {bad!r} has a diff but the diff's config does not diff it "
                                "(inconsistent header)")
        return {"config": config, "fp": fp, "n_diffed": n_diffed, "entries": entries, "zero": zero, "head": head,
                "extra": extra, "shapes": shapes}

    @classmethod
    def _parse_v1(cls, file: Path, header: dict, tensors: dict) -> "SparseDiff":
        c = cls._common(file, header, tensors)
        indices, values = {}, {}
        for name, e in c["entries"].items():
            narrow = tensors.get(f"diff.{name}.positions")
            vals = tensors.get(f"diff.{name}.values")
            if narrow is None or vals is None:
                raise DiffFileError(f"{file} lacks the tensors of {name!r} listed in its header")
            k = e["nnz"]
            if not _is_int(k) or narrow.dim() != 1 or narrow.numel() != k or vals.dim() != 1 or vals.numel() != k \
                    or vals.dtype != torch.float32:
                raise DiffFileError(f"{file}: tensor {name!r} has inconsistent positions/values/shape")
            idx = decode_positions(narrow, tensors.get(f"diff.{name}.jumps"))
            numel = _numel(c["shapes"][name])
            if idx.numel() and (int(idx[-1]) >= numel or int(idx[0]) < 0
                                or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()))):
                raise DiffFileError(f"{file}: tensor {name!r} has inconsistent positions/values/shape")
            indices[name], values[name] = idx, vals
        for name in c["zero"]:
            indices[name] = torch.zeros(0, dtype=torch.int64)
            values[name] = torch.zeros(0)
        return cls(indices, values, c["shapes"], c["head"], c["config"], c["fp"], c["n_diffed"], c["extra"])

    @classmethod
    def _parse_v2(cls, file: Path, header: dict, tensors: dict) -> "SparseDiff":
        c = cls._common(file, header, tensors)
        vd, block = header["value_dtype"], header["value_block"]
        if vd not in codec.VALUE_DTYPES:
            raise DiffFileError(f"{file}: unknown value_dtype {vd!r}")
        if not _is_int(block) or not 1 <= block <= 2**24:
            raise DiffFileError(f"{file}: bad value_block {block!r}")
        if sum(_numel(s) for s in c["shapes"].values()) != c["n_diffed"]:
            raise DiffFileError(f"{file}: n_diffed {c['n_diffed']} is not the number of entries of the listed tensors")
        known = {f"head.{n}" for n in c["head"]}
        indices, values = PositionMap(), {}
        for name, e in c["entries"].items():
            n = _numel(c["shapes"][name])
            k, pentry, ventry = e["nnz"], e["positions"], e["values"]
            if not _is_int(k) or not 1 <= k <= n or not isinstance(pentry, dict) or not isinstance(ventry, dict):
                raise DiffFileError(f"{file}: tensor {name!r} claims {k!r} nonzeros of {n}")
            arrays = {}
            for key in codec.POSITION_ARRAYS.get(pentry.get("codec"), ()):
                t = tensors.get(f"diff.{name}.{_POSITION_SUFFIX[key]}")
                if t is None or t.dtype != torch.uint8 or t.dim() != 1:
                    raise DiffFileError(f"{file}: tensor {name!r} lacks its uint8 position array {key!r}")
                arrays[key] = t.numpy()
                known.add(f"diff.{name}.{_POSITION_SUFFIX[key]}")
            vkeys = codec.VALUE_ARRAYS.get(ventry.get("coding"), ()) + (("scales",) if vd == "int8" else ())
            stored = {key: tensors[f"diff.{name}.{key}"] for key in vkeys if f"diff.{name}.{key}" in tensors}
            known.update(f"diff.{name}.{key}" for key in stored)
            try:
                codec.check_position_sizes(pentry, arrays, n, k)  # sizes first: nothing allocated yet
                codec.check_value_sizes(ventry, stored, vd, k, block)
                codec.decode_positions(pentry, arrays, n, k)  # validate now; decoded again when used
                vals = codec.decode_values(ventry, stored, vd, k, block)
            except codec.CodecError as err:
                raise DiffFileError(f"{file}: tensor {name!r}: {err}") from None
            indices[name] = CodedPositions(pentry, arrays, n, k)
            values[name] = vals
        if set(tensors) - known:
            raise DiffFileError(f"{file} holds tensors its header does not list: {sorted(set(tensors) - known)[:3]}")
        for name in c["zero"]:
            indices[name] = torch.zeros(0, dtype=torch.int64)
            values[name] = torch.zeros(0)
        return cls(indices, values, c["shapes"], c["head"], c["config"], c["fp"], c["n_diffed"], c["extra"],
                   value_dtype=vd)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

"""Property-based fuzzing of the diff file reader (`SparseDiff.load`, `DiffModel.from_pretrained`).

Files are mutated three ways: raw bytes (flips, overwrites, insertions, deletions, truncation) with the
checksum left as it is; the diffprune header edited field by field (any JSON value, huge counts and
shapes, deleted keys) and re-checksummed, so the decoder behind the checksum is reached too; and the
stored tensors replaced (other dtype, length or bytes) and re-checksummed. The only outcomes allowed:

* the unchanged-checksum mutations: a diff equal to the original, or `DiffFileError` /
  `BaseModelMismatchError` (anywhere in a v2 or v3 file; in the tensor bytes of a v1 file, whose checksum
  does not cover its header - a known limit of version 1, which `diffprune compress` rewrites as v3);
* the re-checksummed ones (a deliberately edited, valid-looking file): `DiffFileError` /
  `BaseModelMismatchError`, or a diff that is internally consistent (sorted in-range positions, one
  value per position) and that `from_pretrained` puts on the base or refuses with those errors;

never another exception, and no hang (a load running over 60 s fails the test). Memory: every load runs with the
address-space limit lowered to the process's size + `MEMORY_BOUND` (512 MiB), so a header claiming
10^12 nonzeros that tried to allocate them would fail the test with a MemoryError/RuntimeError.

``DIFFPRUNE_FUZZ_EXAMPLES`` sets the examples per property (default 150; the long run in
benchmarks/results/reliability.md uses more); ``DIFFPRUNE_FUZZ_REPORT=FILE`` appends the counts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import signal
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffprune import BaseModelMismatchError, DiffFileError, DiffModel, DiffPruningConfig, SparseDiff
from diffprune import diff_file
from diffprune._io import proc_bytes

from .conftest import tiny_bert
from .fuzz_report import append_report

EXAMPLES = int(os.environ.get("DIFFPRUNE_FUZZ_EXAMPLES", "150"))
MEMORY_BOUND = 512 * 2**20
ALLOWED = (DiffFileError, BaseModelMismatchError)
COUNTS: dict[str, dict[str, int]] = {}
HANG_SECONDS = 60
# No hypothesis deadline (a loaded CI machine makes timings flaky); a hang is caught by `memory_bound`'s alarm.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


# ---- the files under test ------------------------------------------------------------------------------
def _trained_diff():
    """A tiny BERT's diff (random w, projected to 5%), saved with `value_dtype`: (file bytes, base, dm)."""
    base = tiny_bert(seed=0)
    pristine = copy.deepcopy(base)
    dm = DiffModel(base, DiffPruningConfig(target_sparsity=0.05, use_gates=False))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for slot in dm.slots.values():
            slot.w.copy_(torch.randn(slot.w.shape, generator=g) * 0.1)
    dm.project()
    return dm, pristine


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_originals")
    dm, pristine = _trained_diff()
    out = {}
    for vd in ("fp32", "bf16", "int8"):
        d = root / vd
        dm.save_pretrained(d, extra={"task": "fuzz", "labels": ["a", "b", "c"]}, value_dtype=vd)
        out[vd] = {"bytes": (d / diff_file.DIFF_FILE).read_bytes(), "diff": SparseDiff.load(d)}
    v1 = Path(__file__).parent / "fixtures" / "diff_v1" / diff_file.DIFF_FILE
    out["v1"] = {"bytes": v1.read_bytes(), "diff": SparseDiff.load(v1)}
    out["fp32"]["diff"]._save_v2(root / "v2")  # format v2 (one entry per stream) keeps loading: fuzzed too
    out["v2"] = {"bytes": (root / "v2" / diff_file.DIFF_FILE).read_bytes(), "diff": SparseDiff.load(root / "v2")}
    return out, pristine


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """After the module: what the fuzzers tried, appended to DIFFPRUNE_FUZZ_REPORT when set
    (benchmarks/reliability.py reads it)."""
    yield
    append_report({"diff_file": COUNTS, "examples_per_property": EXAMPLES})


# ---- helpers ---------------------------------------------------------------------------------------------
class Hang(Exception):
    """A load took more than HANG_SECONDS (not an allowed outcome)."""


def _alarm(signum, frame):
    raise Hang(f"a diff load ran for more than {HANG_SECONDS} s")


@contextlib.contextmanager
def memory_bound():
    """Lower the soft address-space limit to now + MEMORY_BOUND for the block (restored after), and
    fail the block if it runs longer than HANG_SECONDS."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = (proc_bytes("/proc/self/status", "VmSize") or 0) + MEMORY_BOUND
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _count(prop: str, outcome: str) -> None:
    c = COUNTS.setdefault(prop, {})
    c[outcome] = c.get(outcome, 0) + 1


def _load_bytes(tmp: Path, data: bytes):
    """SparseDiff.load of `data` written as a fresh diff.safetensors (no diff_config.json beside it), and
    every tensor's positions and values decoded (v2 decodes positions lazily, per tensor), all under the
    memory bound."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / diff_file.DIFF_FILE
    path.write_bytes(data)
    with memory_bound():
        diff = SparseDiff.load(path)
        for name in diff.shapes:
            diff.indices[name], diff.values[name]
        return diff


def _same(a: SparseDiff, b: SparseDiff) -> bool:
    if (a.shapes != b.shapes or a.base_fingerprint != b.base_fingerprint or a.n_diffed != b.n_diffed
            or a.extra != b.extra or a.config.to_dict() != b.config.to_dict() or sorted(a.head) != sorted(b.head)):
        return False
    for name in a.shapes:
        if not torch.equal(a.indices[name], b.indices[name]):
            return False
        if not torch.equal(a.values[name].float(), b.values[name].float()):
            return False
    return all(torch.equal(a.head[n], b.head[n]) for n in a.head)


def _consistent(d: SparseDiff) -> None:
    """A loaded diff must be usable: positions sorted, unique and inside the shape, one value each."""
    for name, shape in d.shapes.items():
        idx, vals = d.indices[name], d.values[name]
        numel = 1
        for s in shape:
            numel *= int(s)
        assert idx.dtype == torch.int64 and idx.dim() == 1, name
        assert vals.dim() == 1 and vals.numel() == idx.numel(), name
        if idx.numel():
            assert int(idx[0]) >= 0 and int(idx[-1]) < numel, name
            assert bool((idx[1:] > idx[:-1]).all()), name


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _opened(tmp: Path, data: bytes):
    """(tensors, safetensors metadata, parsed diffprune header) of a file's bytes, in the per-tensor layout
    (a v3 file unpacked: its table and streams are edited like a v2 file's, then packed again)."""
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "src.safetensors"
    src.write_bytes(data)
    meta, header, tensors = diff_file.read_layout(src)
    return tensors, meta, header


def _rewrite(tmp: Path, tensors: dict, meta: dict, header: dict) -> bytes:
    """A file with `tensors` and `header`, checksummed as the file's format version requires."""
    tmp.mkdir(parents=True, exist_ok=True)
    return diff_file.write_layout(tmp / "rewritten.safetensors", meta, header, tensors).read_bytes()


def _paths(obj, prefix=()):
    """Every path into a JSON value (dict keys and list positions), the root excluded."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 10**12, 2**31, 2**63, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["fp32", "bf16", "fp16", "int8", "uint8", "uint16", "ef", "bitmap", "", "x" * 40]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)

byte_edits = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.floats(0, 1, exclude_max=True),
              st.integers(0, 255)),
    min_size=1, max_size=6,
)


def _edit(data: bytes, edits, start: int = 0) -> bytes:
    """`edits` applied to data[start:] (positions are fractions of that part)."""
    b = bytearray(data)
    for op, where, value in edits:
        if len(b) <= start:
            break
        i = start + int(where * (len(b) - start))
        if op == "flip":
            b[i] ^= 1 << (value % 8)
        elif op == "set":
            b[i] = value
        elif op == "insert":
            b[i:i] = bytes([value])
        else:
            del b[i]
    return bytes(b)


KINDS = ("fp32", "bf16", "int8", "v2", "v1")


# ---- properties --------------------------------------------------------------------------------------------
@FUZZ
@given(kind=st.sampled_from(KINDS), edits=byte_edits, cut=st.none() | st.floats(0, 1, exclude_max=True))
def test_mutated_bytes_load_equal_or_fail_cleanly(originals, tmp_path_factory, kind, edits, cut):
    files, _ = originals
    original = files[kind]["bytes"]
    # A v1 file's checksum covers its tensors only (v2 and v3 cover the header too): there, edit the tensor bytes.
    start = 8 + struct.unpack("<Q", original[:8])[0] if kind == "v1" else 0
    data = _edit(original, edits, start)
    if cut is not None:
        data = data[: int(cut * len(data))]
    try:
        loaded = _load_bytes(tmp_path_factory.mktemp("b"), data)
    except ALLOWED:
        _count("bytes", "refused")
        return
    assert _same(loaded, files[kind]["diff"]), "a corrupted file loaded as a different diff"
    _count("bytes", "loaded equal")


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_edited_and_rechecksummed_header_is_refused_or_consistent(originals, tmp_path_factory, kind, data):
    files, pristine = originals
    tmp = tmp_path_factory.mktemp("h")
    tensors, meta, header = _opened(tmp, files[kind]["bytes"])
    header.pop("checksum", None)
    note(f"file kind {kind}")
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = sorted(_paths(header), key=repr)
        path = data.draw(st.sampled_from(paths), label="path")
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = data.draw(json_values, label="value")
    try:
        blob = _rewrite(tmp, tensors, meta, header)
    except (TypeError, ValueError, OverflowError):
        _count("header", "not writable as JSON")  # e.g. NaN keys: no such file can exist
        return
    note(f"edited header: {json.dumps(header)[:3000]}")
    _check_edited(tmp, blob, pristine, "header")


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_replaced_tensors_are_refused_or_consistent(originals, tmp_path_factory, kind, data):
    files, pristine = originals
    tmp = tmp_path_factory.mktemp("t")
    tensors, meta, header = _opened(tmp, files[kind]["bytes"])
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    how = data.draw(st.sampled_from(["bytes", "dtype", "shorter", "longer", "drop", "empty"]), label="how")
    t = tensors[name]
    if how == "bytes":
        raw = bytearray(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for i in data.draw(st.lists(st.integers(0, max(len(raw) - 1, 0)), min_size=1, max_size=4), label="at"):
            if raw:
                raw[i] = data.draw(st.integers(0, 255))
        tensors[name] = torch.frombuffer(bytearray(raw or b"\0"), dtype=torch.uint8)[: len(raw)].clone().view(t.dtype).reshape(t.shape)
    elif how == "dtype":
        dtype = data.draw(st.sampled_from([torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16,
                                           torch.bfloat16, torch.float32, torch.float64]), label="dtype")
        tensors[name] = t.to(dtype)
    elif how == "shorter":
        tensors[name] = t.reshape(-1)[: max(t.numel() - data.draw(st.integers(1, 8)), 0)].clone()
    elif how == "longer":
        tensors[name] = torch.cat([t.reshape(-1), t.reshape(-1)[:1].repeat(data.draw(st.integers(1, 8)))])
    elif how == "drop":
        del tensors[name]
    else:
        tensors[name] = t.reshape(-1)[:0].clone()
    header.pop("checksum", None)
    blob = _rewrite(tmp, tensors, meta, header)
    _check_edited(tmp, blob, pristine, "tensors")


def _check_edited(tmp: Path, blob: bytes, pristine, prop: str) -> None:
    try:
        loaded = _load_bytes(tmp / "load", blob)
    except ALLOWED:
        _count(prop, "refused")
        return
    _consistent(loaded)
    try:
        with memory_bound():
            DiffModel.from_sparse_diff(copy.deepcopy(pristine), loaded)
    except ALLOWED:
        _count(prop, "loaded, refused by from_pretrained")
        return
    _count(prop, "loaded and applied")


def test_huge_claims_are_refused_without_allocating(originals, tmp_path):
    """A header claiming 10^12 nonzeros fails at load; a tensor claimed to have 10^12 entries is refused
    (by the file check, or by the base whose tensor is smaller) - both under the memory bound."""
    files, pristine = originals
    for kind in ("fp32", "int8", "v2", "v1"):
        src = tmp_path / f"{kind}.safetensors"
        src.write_bytes(files[kind]["bytes"])
        for field, value in (("nnz", 10**12), ("shape", [10**6, 10**6])):
            tensors, meta, header = _opened(tmp_path / f"{kind}-{field}-src", files[kind]["bytes"])
            name = sorted(header["tensors"])[0]
            header["tensors"][name][field] = value
            blob = _rewrite(tmp_path / f"{kind}-{field}", tensors, meta, header)
            if field == "nnz":
                with pytest.raises(DiffFileError):
                    _load_bytes(tmp_path / f"{kind}-{field}-load", blob)
                continue
            with pytest.raises(ALLOWED):
                loaded = _load_bytes(tmp_path / f"{kind}-{field}-load", blob)
                with memory_bound():
                    DiffModel.from_sparse_diff(copy.deepcopy(pristine), loaded)


def test_label_edit_in_header_is_caught_by_the_checksum(originals, tmp_path):
    """Issue 18: a same-length edit of a label name in the header of a saved file no longer loads."""
    files, _ = originals
    data = files["fp32"]["bytes"]
    assert b'\\"b\\"' in data
    edited = data.replace(b'\\"b\\"', b'\\"B\\"', 1)
    assert len(edited) == len(data)
    with pytest.raises(DiffFileError, match="checksum|corrupt"):
        _load_bytes(tmp_path / "edited", edited)



"""Diff file format v2: position codec, value dtypes, checksummed header, v1 compatibility, refusing
malformed files without allocating, the apply engine, and `diffprune compress`."""

import copy
import json
import math
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffprune import DiffFileError, DiffModel, DiffPruningConfig, SparseDiff, codec, diff_file
from diffprune.diff_file import DIFF_FILE, FORMAT_VERSION, header_checksum

from .conftest import tiny_bert
from .helpers_cli import cli, fast_args, one_thread, tiny_base  # noqa: F401

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "diff_v1"
FIXTURE_V2 = Path(__file__).parent / "fixtures" / "diff_v2"


def _roundtrip(pos: np.ndarray, n: int) -> tuple[dict, dict]:
    entry, arrays = codec.encode_positions(pos, n)
    for trusted in (False, True):
        out = codec.decode_positions(entry, arrays, n, pos.shape[0], trusted=trusted)
        assert out.dtype == np.int64 and np.array_equal(out, pos), (entry, trusted)
    return entry, arrays


@pytest.mark.parametrize("n,density", [(3_000_000, 1e-6), (1_000_000, 1e-4), (200_000, 0.005), (50_000, 0.1),
                                       (20_000, 0.5), (20_000, 0.9), (777, 0.3)])
def test_positions_roundtrip_random_masks(n, density):
    rng = np.random.default_rng(int(density * 1e6) + n)
    k = max(1, round(density * n))
    pos = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    entry, arrays = _roundtrip(pos, n)
    # never worse than a bitmap, plus a byte
    assert codec.position_bytes(arrays) <= (n + 7) // 8 + 1


@pytest.mark.parametrize("n,pos", [
    (10, []), (10, [0]), (10, [9]), (1, [0]), (10, list(range(10))), (10, [0, 9]), (2**40, [0, 2**40 - 1]),
    (1000, list(range(1, 1000))), (1000, list(range(0, 1000, 2))), (5, [4]), (300_000, [299_999]),
])
def test_positions_roundtrip_edge_cases(n, pos):
    _roundtrip(np.array(pos, dtype=np.int64), n)


def test_batched_decoding_equals_per_tensor_decoding(tmp_path):
    rng = np.random.default_rng(3)
    shapes = {f"t{i}": (int(n),) for i, n in enumerate(rng.integers(50, 40_000, 40))}
    shapes["dense"] = (300,)
    idx = {}
    for name, (n,) in shapes.items():
        k = max(1, round(n * (0.7 if name == "dense" else rng.choice([0.002, 0.005, 0.02]))))
        idx[name] = torch.from_numpy(np.sort(rng.choice(n, k, replace=False)).astype(np.int64))
    vals = {n: torch.randn(i.numel()) for n, i in idx.items()}
    SparseDiff(idx, vals, shapes, {}, DiffPruningConfig(), "fp", sum(s[0] for s in shapes.values())).save(tmp_path / "d")
    d = SparseDiff.load(tmp_path / "d")
    for budget in (None, 100, 5000):
        got = dict(d.indices.iter_decoded(budget=budget))
        assert set(got) == set(idx)
        for name in idx:
            assert torch.equal(got[name], idx[name]) and torch.equal(d.indices[name], idx[name]), (budget, name)


def test_position_bits_are_within_ten_percent_of_the_bound():
    n, density = 2_000_000, 0.005
    k = round(n * density)
    pos = np.sort(np.random.default_rng(0).choice(n, k, replace=False)).astype(np.int64)
    entry, arrays = _roundtrip(pos, n)
    bits = 8 * codec.position_bytes(arrays)
    bound = codec.position_bound_bits(n, k)
    assert entry["codec"] == "rice"
    assert bound / k == pytest.approx(9.08, abs=0.02)
    assert bits <= 1.10 * bound, (bits / k, bound / k)
    assert bits <= 1.02 * bound  # measured: 9.11 bits per nonzero against 9.08


def _diff(k_big: int = 5000, seed: int = 0, wide: bool = False) -> SparseDiff:
    g = torch.Generator().manual_seed(seed)
    shapes = {"big.weight": (100, 1000), "small.bias": (7,), "empty.bias": (3,)}
    idx = {"big.weight": torch.sort(torch.randperm(100_000, generator=g)[:k_big]).values,
           "small.bias": torch.tensor([0, 6]), "empty.bias": torch.zeros(0, dtype=torch.int64)}
    vals = {"big.weight": torch.randn(k_big, generator=g) * 1e-3, "small.bias": torch.tensor([0.5, -3.0]),
            "empty.bias": torch.zeros(0)}
    vals["big.weight"][17] = 0.25  # one outlier: int8 scales are per block
    if wide == "float":  # exponents spread over the whole range: the raw coding is the smallest
        vals["big.weight"] = torch.randn(k_big, generator=g) * torch.exp(torch.rand(k_big, generator=g) * 150 - 75)
        vals["big.weight"][0] = 0.0
    elif wide == "int8":  # uniform values: every int8 code as likely
        vals["big.weight"] = torch.rand(k_big, generator=g) * 2 - 1
    return SparseDiff(idx, vals, shapes, {"h.weight": torch.ones(2, 2)}, DiffPruningConfig(), "fp", 100_010,
                      extra={"task": "t", "labels": ["no", "yes"]})


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("value_dtype", ["fp32", "bf16", "fp16", "int8"])
def test_value_dtypes_roundtrip(tmp_path, value_dtype, wide):
    d = _diff(wide=wide and ("int8" if value_dtype == "int8" else "float"))
    if wide and value_dtype == "fp16":
        d.values["big.weight"] = d.values["big.weight"].clamp(-6e4, 6e4)
    d.save(tmp_path / "d", value_dtype=value_dtype)
    header = json.loads(_read(tmp_path / "d")[0]["header"])
    coding = header["tensors"]["big.weight"]["values"]["coding"]
    if value_dtype == "int8":
        assert coding == ("raw" if wide else "zigzag_rice")
    else:
        assert coding == ("raw" if wide else "exp_rice")
    back = SparseDiff.load(tmp_path / "d")
    assert back.format_version == FORMAT_VERSION and back.value_dtype == value_dtype
    assert back.shapes == d.shapes and back.extra == d.extra and back.nnz == d.nnz
    for name in d.shapes:
        assert torch.equal(back.indices[name], d.indices[name])
        v, got = d.values[name], back.values[name]
        assert got.dtype == torch.float32 and got.shape == v.shape
        if value_dtype == "fp32":
            assert torch.equal(got, v)
        elif value_dtype in ("bf16", "fp16"):
            assert torch.equal(got, v.to(codec.TORCH_VALUE_DTYPES[value_dtype]).float())
        elif v.numel():
            block = codec.INT8_BLOCK
            pad = torch.zeros(math.ceil(v.numel() / block) * block)
            pad[: v.numel()] = v
            scale = (pad.view(-1, block).abs().amax(1) / 127).repeat_interleave(block)[: v.numel()]
            assert bool(((got - v).abs() <= scale / 2 * (1 + 1e-5)).all())
    s = back.summary()
    assert s["value_dtype"] == value_dtype and s["format_version"] == FORMAT_VERSION
    width = codec.VALUE_BITS[value_dtype]
    assert s["value_width_bits"] == width
    if wide:
        assert width <= s["value_bits_per_nonzero"] < width + 0.1  # (+ int8 scales)
    else:  # N(0, 1e-3) values: exponents are Rice coded in ~3.4 bits (int8: zigzag Rice, ~7 bits)
        assert s["value_bits_per_nonzero"] < width - (0.5 if value_dtype == "int8" else 2)
    assert s["position_bits_per_nonzero"] >= s["position_bound_bits_per_nonzero"] > 0  # a random mask
    assert back.encoded_sizes() == d.encoded_sizes(value_dtype)
    written = json.loads((tmp_path / "d" / "diff_config.json").read_text())  # sizes counted while saving
    sizes = back.encoded_sizes()
    assert (written["position_bytes"], written["value_bytes"], written["head_bytes"]) == (
        sizes["positions"], sizes["values"], sizes["head"])
    size = (tmp_path / "d" / DIFF_FILE).stat().st_size
    assert size < sum(back.encoded_sizes().values()) + 4096  # the header is the rest


def test_fp16_overflow_and_bad_dtype_are_refused(tmp_path):
    from diffprune import ConfigError

    d = _diff()
    d.values["small.bias"] = torch.tensor([1e6, 0.0])
    with pytest.raises(DiffFileError, match="fp16 range"):
        d.save(tmp_path / "d", value_dtype="fp16")
    with pytest.raises(ConfigError, match="value_dtype"):
        d.save(tmp_path / "d", value_dtype="int4")


def test_version_1_fixture_loads():
    d = SparseDiff.load(FIXTURE_V1)
    assert d.format_version == 1
    assert {n: d.indices[n].tolist() for n in d.indices} == {
        "a.weight": [0, 3, 7, 19], "b.weight": [5, 100, 200000, 299999], "c.bias": []}
    assert {n: d.values[n].tolist() for n in ("a.weight", "b.weight")} == {
        "a.weight": [0.5, -0.25, 1.0, 2.0], "b.weight": [-1.5, 0.125, 3.0, -0.0625]}
    assert d.values["c.bias"].numel() == 0
    assert d.shapes == {"a.weight": (4, 5), "b.weight": (300000,), "c.bias": (3,)}
    assert {n: t.tolist() for n, t in d.head.items()} == {"h.weight": [[1.0, 2.0], [3.0, 4.0]]}
    assert d.extra == {"task": "fixture", "labels": ["no", "yes"]}
    assert d.n_diffed == 300023
    s = d.summary()
    assert s["format_version"] == 1 and s["nnz"] == 8


def test_version_1_fixture_resaves_as_the_current_version(tmp_path):
    d = SparseDiff.load(FIXTURE_V1)
    d.save(tmp_path / "now")
    back = SparseDiff.load(tmp_path / "now")
    assert back.format_version == FORMAT_VERSION == 3
    for n in d.shapes:
        assert torch.equal(back.indices[n], d.indices[n]) and torch.equal(back.values[n], d.values[n])


def test_version_2_fixture_loads():
    """A v2 file (one safetensors entry per coded stream; written by diffprune before v3) keeps loading: the
    fixture holds the v1 fixture's diff, in int8 values."""
    v1, v2 = SparseDiff.load(FIXTURE_V1), SparseDiff.load(FIXTURE_V2)
    assert v2.format_version == 2 and v2.value_dtype == "int8"
    meta, _ = _read(FIXTURE_V2)
    assert meta["format_version"] == "2"
    assert v2.shapes == v1.shapes and v2.extra == v1.extra and v2.n_diffed == v1.n_diffed
    for n in v1.shapes:
        assert torch.equal(v2.indices[n], v1.indices[n])
        scale = v1.values[n].abs().max() / 127 if v1.values[n].numel() else 0
        assert bool(((v2.values[n] - v1.values[n]).abs() <= scale / 2 + 1e-7).all())


def test_version_3_packs_the_streams_and_the_table(tmp_path):
    """v3 stores exactly what v2 does (the same coded streams) in four safetensors entries, whatever the
    number of tensors, with the per-tensor table compressed: a 100-tensor diff's header is a few kB, not
    tens of kB, and the rest of the file is the same bytes."""
    shapes = {f"model.layers.{i}.mlp.{part}.weight": (64, 48) for i in range(25) for part in ("up", "down", "gate", "o")}
    g = torch.Generator().manual_seed(0)
    indices = {n: torch.randperm(64 * 48, generator=g)[:20].sort().values for n in shapes}
    values = {n: torch.randn(20, generator=g) * 1e-3 for n in shapes}
    cfg = DiffPruningConfig(head_parameters=[], frozen_parameters=[])
    d = SparseDiff(indices, values, shapes, {}, cfg, "fp", sum(64 * 48 for _ in shapes))
    d.save(tmp_path / "v3", value_dtype="bf16")
    d._save_v2(tmp_path / "v2", value_dtype="bf16")

    def header_bytes(path):
        import struct
        return 8 + struct.unpack("<Q", (path / DIFF_FILE).read_bytes()[:8])[0]

    with safe_open(str(tmp_path / "v3" / DIFF_FILE), framework="pt") as f:
        assert sorted(f.keys()) == ["index", "streams"]
    h2, h3 = header_bytes(tmp_path / "v2"), header_bytes(tmp_path / "v3")
    size2, size3 = ((tmp_path / v / DIFF_FILE).stat().st_size for v in ("v2", "v3"))
    assert h2 > 40_000 and h3 < 3_000  # 500 safetensors entries and a JSON table, against 2 and a zlib'd table
    index = _raw(tmp_path / "v3", "index")
    assert len(json.loads(zlib.decompress(index))["tensors"]) == 100
    assert size3 - h3 == size2 - h2 + len(index)  # the data: v2's stream bytes, then the compressed table
    back2, back3 = SparseDiff.load(tmp_path / "v2"), SparseDiff.load(tmp_path / "v3")
    assert back2.format_version == 2 and back3.format_version == 3
    for n in shapes:
        assert torch.equal(back3.indices[n], back2.indices[n]) and torch.equal(back3.values[n], back2.values[n])


def _raw(path, key) -> bytes:
    with safe_open(str(path / DIFF_FILE), framework="pt") as f:
        return f.get_tensor(key).numpy().tobytes()


def _read(path):
    """(safetensors metadata with the full header, the tensors) in the per-tensor layout (v3 unpacked)."""
    meta, header, tensors = diff_file.read_layout(path)
    return {**meta, "header": json.dumps(header)}, tensors


def _write(path, meta, tensors, header=None, rechecksum=False):
    header = header if header is not None else json.loads(meta["header"])
    (path / "diff_config.json").unlink(missing_ok=True)
    diff_file.write_layout(path, meta, header, tensors, rechecksum=rechecksum)


def test_editing_the_header_is_detected(tmp_path):
    _diff().save(tmp_path / "d")
    meta, tensors = _read(tmp_path / "d")
    header = json.loads(meta["header"])
    header["extra"]["labels"] = ["on", "yes"]  # same length
    _write(tmp_path / "d", meta, tensors, header)
    with pytest.raises(DiffFileError, match="checksum"):
        SparseDiff.load(tmp_path / "d")
    _write(tmp_path / "d", meta, tensors, header, rechecksum=True)  # the helper makes it valid again
    assert SparseDiff.load(tmp_path / "d").extra["labels"] == ["on", "yes"]
    # the version field is covered too
    _write(tmp_path / "d", {**meta, "format_version": "1"}, tensors)
    with pytest.raises(DiffFileError, match="checksum"):
        SparseDiff.load(tmp_path / "d")


def _tamper(tmp_path, edit, tensors_edit=None):
    _diff().save(tmp_path / "d")
    meta, tensors = _read(tmp_path / "d")
    header = json.loads(meta["header"])
    edit(header)
    if tensors_edit:
        tensors_edit(tensors)
    _write(tmp_path / "d", meta, tensors, header, rechecksum=True)
    tracemalloc.start()
    try:
        with pytest.raises(DiffFileError):
            SparseDiff.load(tmp_path / "d")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000  # nothing sized by the claims was allocated


def _set(path, value):
    def edit(header):
        obj = header
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


@pytest.mark.parametrize("path,value", [
    (("tensors", "big.weight", "nnz"), 10**12),
    (("tensors", "big.weight", "shape"), [10**6, 10**6]),
    (("tensors", "big.weight", "shape"), [10**12]),
    (("zero_tensors", "empty.bias"), [10**12]),
    (("n_diffed", ), 10**12),
    (("tensors", "big.weight", "positions", "count"), 10**12),
    (("tensors", "big.weight", "positions", "bits"), 10**12),
    (("tensors", "big.weight", "positions", "r"), 62),
    (("tensors", "big.weight", "positions", "codec"), "bitmap"),
    (("tensors", "big.weight", "positions", "codec"), "rice_complement"),
    (("tensors", "big.weight", "positions"), "rice"),
    (("tensors", "big.weight", "values", "coding"), "raw"),
    (("tensors", "big.weight", "values", "coding"), "zigzag_rice"),
    (("tensors", "big.weight", "values", "eref"), 300),
    (("tensors", "big.weight", "values", "eref"), -1),
    (("tensors", "big.weight", "values", "bits"), 10**12),
    (("tensors", "small.bias", "values"), None),
    (("tensors", "big.weight", "shape"), [-5]),
    (("tensors", "big.weight", "shape"), ["x"]),
    (("value_dtype", ), "int8"),
    (("value_block", ), 0),
    (("tensors", "small.bias", "nnz"), 3),
    (("head", ), ["nope"]),
    (("config", ), {"bogus": 1}),
    (("extra", ), [1]),
    (("tensors", ), []),
])
def test_malformed_headers_are_refused_without_allocating(tmp_path, path, value):
    _tamper(tmp_path, _set(path, value))


@pytest.mark.parametrize("what", ["flip_high", "flip_low", "drop_values", "truncate_high", "extra_tensor", "wrong_dtype",
                                  "flip_exponent"])
def test_malformed_tensors_are_refused(tmp_path, what):
    def edit_tensors(t):
        if what == "flip_high":
            t["diff.big.weight.pos_high"][3] ^= 0xFF
        elif what == "flip_low":  # may still decode, but then not to increasing positions in range
            t["diff.big.weight.pos_low"][-1] = 0xFF
            t["diff.big.weight.pos_high"][-1] = 0x80
        elif what == "drop_values":
            del t["diff.big.weight.val_sm"]
        elif what == "truncate_high":
            t["diff.big.weight.pos_high"] = t["diff.big.weight.pos_high"][:-1].clone()
        elif what == "extra_tensor":
            t["diff.other.values"] = torch.zeros(3)
        elif what == "wrong_dtype":
            t["diff.small.bias.values"] = t["diff.small.bias.values"].double()
        elif what == "flip_exponent":  # an exponent past the range
            t["diff.big.weight.val_exp_high"][:] = 0
            t["diff.big.weight.val_exp_high"][-1] = 0x80
            t["diff.big.weight.val_exp_low"][:] = 0xFF
    _tamper(tmp_path, lambda h: None, edit_tensors)


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    base = tiny_bert()
    pristine = copy.deepcopy(base)
    dm = DiffModel(base, DiffPruningConfig(target_sparsity=0.05))
    with torch.no_grad():
        dm.project()
        for slot in dm.slots.values():
            slot.values.normal_(0, 0.02)
    return pristine, dm


@pytest.mark.parametrize("value_dtype", ["fp32", "int8"])
def test_apply_revert_bit_exact_and_merge_equals_apply(tmp_path, trained, bert_batch, value_dtype):
    pristine, dm = trained
    dm.save_pretrained(tmp_path / "d", value_dtype=value_dtype)
    sparse = SparseDiff.load(tmp_path / "d")
    m = copy.deepcopy(pristine)
    before = _state(m)
    sparse.apply_(m)
    applied = _state(m)
    assert any(not torch.equal(applied[n], before[n]) for n in before)
    sparse.revert_(m)
    for n, t in _state(m).items():
        assert torch.equal(t, before[n]), n  # bit-exact
    merged = DiffModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "d").merge_and_unload()
    for n, t in _state(merged).items():
        assert torch.equal(t, applied[n]), n
    # and the forward of the unmerged DiffModel (the fixed-mask path) sees the same weights
    loaded = DiffModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "d")
    with torch.no_grad():
        ids = {"input_ids": bert_batch["input_ids"]}
        assert torch.equal(loaded(**ids).logits, merged(**ids).logits)
    if value_dtype == "fp32":  # the in-memory diff applies to the same bits as its fp32 file
        ref = copy.deepcopy(pristine)
        dm.to_sparse_diff().apply_(ref)
        for n, t in _state(ref).items():
            assert torch.equal(t, applied[n]), n


def test_fixed_stage_values_still_train(trained, bert_batch):
    _, dm = trained
    dm = copy.deepcopy(dm).train()
    out = dm(**bert_batch)
    out.loss.backward()
    grads = [s.values.grad for s in dm.slots.values() if s.values.numel()]
    assert grads and all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)


def test_compress_cli_end_to_end(tmp_path, tiny_base):
    lines = ["review,stars"] + [f'"a {w} film {i}",{lab}' for i, (w, lab) in
                                enumerate([("great", "pos"), ("awful", "neg")] * 10)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    cli(*fast_args(tiny_base, run, "--train-file", tmp_path / "train.csv", "--validation-file", tmp_path / "train.csv",
                   "--text-columns", "review", "--label-column", "stars", "--epochs", 1, "--fixmask-epochs", 1,
                   "--target-sparsity", 0.01, "--value-dtype", "bf16"))
    src = SparseDiff.load(run)
    assert src.value_dtype == "bf16"
    out = tmp_path / "small"
    _, stdout, _ = cli("compress", run, "--value-dtype", "int8", "--output-dir", out)
    assert "bits per nonzero" in stdout
    for name in ("run.json", "metrics.json", "README.md", "train_log.jsonl", DIFF_FILE, "diff_config.json"):
        assert (out / name).is_file(), name
    assert (out / "README.md").read_bytes() == (run / "README.md").read_bytes()
    small = SparseDiff.load(out)
    assert small.value_dtype == "int8" and small.nnz == src.nnz and small.extra == src.extra
    assert (out / DIFF_FILE).stat().st_size < (run / DIFF_FILE).stat().st_size
    assert json.loads((out / "metrics.json").read_text())["stored_bytes"] == (out / DIFF_FILE).stat().st_size
    for n in src.shapes:
        assert torch.equal(small.indices[n], src.indices[n])
        if src.values[n].numel():
            assert torch.allclose(small.values[n], src.values[n], rtol=0, atol=float(src.values[n].abs().max()) / 254 * 1.001)
    _, stdout, _ = cli("inspect", out)
    assert "bits per nonzero" in stdout and "int8" in stdout and "bound log2 C(n, k)" in stdout
    _, stdout, _ = cli("inspect", out, "--json")
    store = json.loads(stdout)["storage"]
    # (a trained mask is not uniformly random, so its code may even beat the bound for random masks)
    assert store["value_dtype"] == "int8" and store["position_bits_per_nonzero"] > 0
    assert store["position_bound_bits_per_nonzero"] > 0 and 8 <= store["value_bits_per_nonzero"] < 8.5  # + the scales
    _, stdout, _ = cli("predict", out, "--text", "a great film")
    assert json.loads(stdout)["label"] in ("pos", "neg")
    for args, msg in [((run, "--value-dtype", "int8", "--output-dir", out), "already exists"),
                      ((tmp_path / "nowhere", "--value-dtype", "int8", "--output-dir", tmp_path / "o2"), "does not exist"),
                      ((run, "--value-dtype", "int8", "--output-dir", run, "--overwrite"), "must differ")]:
        code, stdout, err = cli("compress", *args, check=False)
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and msg in err, err
    cli("compress", run, "--value-dtype", "fp16", "--output-dir", out, "--overwrite")
    assert SparseDiff.load(out).value_dtype == "fp16"

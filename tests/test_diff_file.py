import copy
import json
import os

import pytest
import torch

from diffprune import BaseModelMismatchError, DiffFileError, DiffModel, DiffPruningConfig, SparseDiff
from diffprune.diff_file import CONFIG_FILE, DIFF_FILE, decode_positions, encode_positions

from .conftest import tiny_bert


@pytest.fixture
def saved(tmp_path, bert_batch):
    torch.manual_seed(0)
    base = tiny_bert()
    pristine = copy.deepcopy(base)
    dm = DiffModel(base, DiffPruningConfig(target_sparsity=0.05))
    opt = torch.optim.AdamW(dm.param_groups(lr=1e-2))
    dm.train()
    for _ in range(3):
        dm(**bert_batch).loss.backward()
        opt.step()
        opt.zero_grad()
    dm.project()
    dm.save_pretrained(tmp_path / "d", extra={"task": "demo"})
    return tmp_path / "d", pristine, dm


@pytest.mark.parametrize("gaps", [[0, 1, 5], [3, 300, 70_000, 5], [2**33, 1], list(range(1, 1000))])
def test_position_encoding_roundtrip(gaps):
    pos = torch.cumsum(torch.tensor(gaps, dtype=torch.int64), 0)
    narrow, jumps = encode_positions(pos)
    assert narrow.dtype in (torch.uint8, torch.uint16, torch.uint32)
    assert torch.equal(decode_positions(narrow, jumps), pos)


def test_positions_are_compact():
    g = torch.Generator().manual_seed(0)
    pos = torch.sort(torch.randperm(10_000_000, generator=g)[:50_000]).values  # 0.5% density
    narrow, jumps = encode_positions(pos)
    bytes_per = (narrow.numel() * narrow.element_size() + 8 * jumps.numel()) / pos.numel()
    assert bytes_per <= 2.1  # int64 would be 8
    assert torch.equal(decode_positions(narrow, jumps), pos)


def test_files_and_metadata(saved):
    path, _, dm = saved
    assert sorted(os.listdir(path)) == [DIFF_FILE, CONFIG_FILE]
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["nnz"] == dm.nnz()
    assert meta["base_fingerprint"] == dm.base_fingerprint
    assert 3.0 < meta["bytes_per_nonzero"] < 6.5  # v2: Rice-coded positions and exponents of fp32 values
    assert meta["stored_bytes"] == os.path.getsize(path / DIFF_FILE)
    sparse = SparseDiff.load(path)
    assert sparse.extra == {"task": "demo"}
    assert sparse.config.target_sparsity == 0.05


def test_wrong_base_is_refused(saved):
    path, _, _ = saved
    other = tiny_bert(seed=1)
    with pytest.raises(BaseModelMismatchError, match="different base model"):
        DiffModel.from_pretrained(copy.deepcopy(other), path)
    with pytest.raises(BaseModelMismatchError, match="different base model"):
        SparseDiff.load(path).apply_(copy.deepcopy(other))
    # explicit override
    DiffModel.from_pretrained(copy.deepcopy(other), path, allow_base_mismatch=True)


def test_wrong_architecture_is_refused(saved):
    path, _, _ = saved
    with pytest.raises(BaseModelMismatchError):
        SparseDiff.load(path).apply_(tiny_bert(num_labels=5), allow_base_mismatch=True)


def test_a_base_in_another_dtype_is_refused(saved):
    path, pristine, _ = saved
    with pytest.raises(BaseModelMismatchError):
        SparseDiff.load(path).apply_(copy.deepcopy(pristine).to(torch.float64))


def test_truncated_file_is_refused(saved):
    path, _, _ = saved
    data = (path / DIFF_FILE).read_bytes()
    for cut in (10, len(data) // 2, len(data) - 3):
        (path / DIFF_FILE).write_bytes(data[:cut])
        with pytest.raises(DiffFileError, match="truncated or corrupted"):
            SparseDiff.load(path)


def test_corrupted_values_are_refused(saved):
    path, _, _ = saved
    data = bytearray((path / DIFF_FILE).read_bytes())
    data[-5] ^= 0xFF
    (path / DIFF_FILE).write_bytes(bytes(data))
    with pytest.raises(DiffFileError, match="checksum"):
        SparseDiff.load(path)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.float64])
def test_a_stream_stored_in_a_foreign_dtype_is_refused(saved, tmp_path, dtype):
    """An edited file whose positions stream is stored as another integer or float type is written
    as it is (the fuzzer found the writer crashing on int32) and refused at load, by name."""
    from diffprune import diff_file

    path, _, _ = saved
    meta, header, tensors = diff_file.read_layout(path / DIFF_FILE)
    name = next(k for k in sorted(tensors) if k.endswith(".pos_high"))
    tensors[name] = tensors[name].to(dtype)
    header.pop("checksum", None)
    out = diff_file.write_layout(tmp_path / "edited" / DIFF_FILE, meta, header, tensors)
    with pytest.raises(DiffFileError):
        SparseDiff.load(out)


def test_missing_files_and_foreign_files(tmp_path, saved):
    with pytest.raises(DiffFileError, match="no diff at"):
        SparseDiff.load(tmp_path / "nowhere")
    from safetensors.torch import save_file

    (tmp_path / "foreign").mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign" / DIFF_FILE))
    with pytest.raises(DiffFileError, match="not a diffprune sparse diff"):
        SparseDiff.load(tmp_path / "foreign")


def test_mismatched_config_sidecar_is_refused(saved):
    path, _, _ = saved
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["save_id"] = "other"
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(DiffFileError, match="different saves"):
        SparseDiff.load(path)


def test_save_is_atomic(saved, monkeypatch):
    path, _, dm = saved
    before = (path / DIFF_FILE).read_bytes()
    import diffprune.diff_file as df

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(df, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        dm.save_pretrained(path)
    assert (path / DIFF_FILE).read_bytes() == before  # old diff intact, no partial file under the name
    assert [p for p in os.listdir(path) if p.endswith(".tmp")] == []
    # a first save that is interrupted leaves nothing under the final name
    with pytest.raises(KeyboardInterrupt):
        dm.save_pretrained(path.parent / "fresh")
    assert not (path.parent / "fresh" / DIFF_FILE).exists()


def test_apply_twice_and_revert_unapplied_are_errors(saved):
    path, pristine, _ = saved
    sparse = SparseDiff.load(path)
    m = copy.deepcopy(pristine)
    sparse.apply_(m)
    with pytest.raises(DiffFileError, match="already applied"):
        sparse.apply_(m)
    sparse.revert_(m)
    with pytest.raises(DiffFileError, match="not applied"):
        sparse.revert_(m)


def test_config_json_roundtrip_and_unknown_keys():
    from diffprune import ConfigError

    cfg = DiffPruningConfig(structured=True, target_sparsity=0.01, head_parameters=["score"])
    assert DiffPruningConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown DiffPruningConfig keys"):
        DiffPruningConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="list of patterns"):
        DiffPruningConfig(head_parameters="classifier")


def test_saved_files_get_the_umask_permissions_not_mkstemp_0600(saved):
    from diffprune import _io

    path, _, _ = saved
    for name in (DIFF_FILE, "diff_config.json"):
        assert (path / name).stat().st_mode & 0o777 == 0o666 & ~_io._UMASK


def test_kept_decoded_positions_apply_and_revert_the_same_bits(saved, bert_batch):
    path, pristine, _ = saved
    plain, kept = SparseDiff.load(path), SparseDiff.load(path).keep_decoded_positions()
    a, b = copy.deepcopy(pristine), copy.deepcopy(pristine)
    plain.apply_(a)
    kept.apply_(b)  # decodes, and keeps the positions
    cache = kept.indices._decoded
    nonzero = [n for n in kept.indices if kept.nnz_of(n)]
    assert sorted(cache) == sorted(nonzero) and all(cache[n].dtype == torch.int64 for n in cache)
    assert all(torch.equal(cache[n], plain.indices[n]) for n in nonzero)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    kept.revert_(b)
    kept.apply_(b)  # from the kept positions
    torch.testing.assert_close(b(**bert_batch).logits, a(**bert_batch).logits, rtol=0, atol=0)
    kept.revert_(b)
    for (n, p0), pb in zip(pristine.named_parameters(), b.parameters()):
        assert torch.equal(p0, pb), n  # bit-exact revert
    kept.keep_decoded_positions(False)
    assert kept.indices._decoded is None

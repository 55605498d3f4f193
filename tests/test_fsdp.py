"""`--fsdp` over two gloo ranks (torchrun) on a tiny BERT: each rank holds half of the weights and of the
diff state, the run ends with the diff one process makes with the same global batch (gradient clipping
active), and a run stopped mid-L0-epoch and again mid-fixed-mask-stage resumes to the uninterrupted run's
diff. Also the memory estimate under sharding and the refusal of accelerate's own FSDP plugin."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffprune import SparseDiff
from diffprune.training import TrainConfig, train

from .helpers_cli import ENV, REPO, glue, one_thread, save_tiny_base  # noqa: F401

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
# 64 examples at a global batch of 16: 4 steps per epoch, 2 L0 epochs + 1 fixed-mask epoch = 12 steps;
# checkpoints every 2 steps. lr 1e-3 so that 12 steps move the values well away from 0; gradient norms are
# 0.02-0.37 here, so a clip norm of 0.1 scales most steps (AdamW alone would hide a wrong gradient scale).
RUN = dict(task="rte", max_train_samples=64, max_eval_samples=32, epochs=2, fixmask_epochs=1, max_seq_length=32,
           target_sparsity=0.02, seed=0, lr=1e-3, save_steps=2, progress=False, fsdp=True, max_grad_norm=0.1)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    # no dropout: two processes draw dropout masks one process would not, and the runs could not agree
    return save_tiny_base(tmp_path_factory.mktemp("fsdp_base"), dropout=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(spec: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(WORKER), json.dumps(spec)]
    return subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)


def _assert_same_diff(a_dir: Path, b_dir: Path, rtol: float) -> None:
    a, b = SparseDiff.load(a_dir), SparseDiff.load(b_dir)
    assert a.nnz == b.nnz and set(a.indices) == set(b.indices)
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name]), name
        torch.testing.assert_close(a.values[name], b.values[name], rtol=rtol, atol=1e-7)
    for name in a.head:
        torch.testing.assert_close(a.head[name], b.head[name], rtol=rtol, atol=1e-7)


def test_fsdp_two_ranks_equal_one_process_and_resume(tmp_path, base, glue):
    common = {**RUN, "data_dir": str(glue), "model": str(base)}
    one = train(TrainConfig(output_dir=str(tmp_path / "one"), batch_size=16, **common))
    # the clipping matters: without it the diff is another one (so the comparisons below check it too)
    train(TrainConfig(output_dir=str(tmp_path / "unclipped"), batch_size=16, **{**common, "max_grad_norm": 1e9}))
    with pytest.raises(AssertionError):
        _assert_same_diff(tmp_path / "one", tmp_path / "unclipped", rtol=1e-2)

    shards = tmp_path / "shards"
    done = _torchrun({**common, "output_dir": str(tmp_path / "two"), "batch_size": 8, "debug_rank_hashes": True,
                      "shard_report": str(shards)})
    assert done.returncode == 0, done.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 12
    # each rank holds about half of the diffed weights and of w / alpha (a 0-dim group logit is replicated)
    for rank in (0, 1):
        held = json.loads((shards / f"rank{rank}.json").read_text())
        assert held["blocks"] == 3  # BertEmbeddings and the two BertLayers (the model's _no_split_modules)
        assert 0.45 < held["theta_local"] / held["theta_full"] < 0.55
        assert 0.45 < held["slots_local"] / held["slots_full"] < 0.55
    # both ranks end with the same trainable state, and it is the one-process run's
    hashes = [json.loads((tmp_path / "two" / "rank-hashes" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert hashes[0] == {**hashes[1], "rank": 0} and hashes[0]["nnz"] == one["nnz"]
    _assert_same_diff(tmp_path / "one", tmp_path / "two", rtol=1e-4)

    # stopped right after the step-2 checkpoint (mid L0 epoch: sharded w, alpha and moments restored) ...
    res = {**common, "output_dir": str(tmp_path / "res"), "batch_size": 8}
    stopped = _torchrun({**res, "stop_after_checkpoints": 1})
    assert stopped.returncode != 0 and not (tmp_path / "res" / "metrics.json").exists()
    assert json.loads((tmp_path / "res" / "checkpoint" / "latest.json").read_text())["dir"] == "step-000000002"
    # ... resumed and stopped again at step 10 (mid fixed-mask stage: the kept values restored sharded) ...
    stopped = _torchrun({**res, "resume": True, "stop_after_checkpoints": 4})
    assert stopped.returncode != 0, stopped.stderr[-4000:]
    assert json.loads((tmp_path / "res" / "checkpoint" / "latest.json").read_text())["dir"] == "step-000000010"
    # ... and resumed to the end: the uninterrupted two-rank run's diff
    done = _torchrun({**res, "resume": True})
    assert done.returncode == 0, done.stderr[-4000:]
    log = [json.loads(x) for x in (tmp_path / "res" / "train_log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in log if r.get("event") == "resume"] == [2, 10]
    _assert_same_diff(tmp_path / "two", tmp_path / "res", rtol=1e-5)


def test_memory_estimate_counts_shards_and_the_processes_sharing_the_memory(monkeypatch):
    from diffprune.methods import get_method
    from diffprune.training import TrainError, memory

    base = torch.nn.Linear(1024, 1024)  # 1,049,600 parameters: 36 bytes each for structured = 36.0 MiB
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    structured = get_method("structured")

    def needs(**kw) -> str:
        with pytest.raises(TrainError) as e:
            memory.check_memory(structured, base, torch.device("cpu"), None, **kw)
        return str(e.value).split("needs about ")[1].split(":")[0]

    # 36 bytes of state less the 4 of effective weights that backward frees as it makes the 8 of gradients
    assert needs() == "32.0 MiB"
    assert needs(shards=2) == "16.0 MiB"  # one accelerator per process: each holds half
    assert needs(shards=2, sharing=2) == "32.0 MiB"  # two ranks on one CPU host: both halves in this memory
    assert needs(sharing=2) == "64.1 MiB"  # plain data parallel on one host: a whole copy per process
    assert "(2 processes in this memory, each holding 1/2 of the state)" in str(
        pytest.raises(TrainError, memory.check_memory, structured, base, "cpu", None, shards=2, sharing=2).value)


def test_accelerates_own_fsdp_plugin_is_refused_before_anything_starts(tmp_path, monkeypatch):
    from diffprune.training import TrainError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(TrainError, match=r"--use_fsdp.*pass --fsdp to 'diffprune train'"):
        train(TrainConfig(output_dir=str(tmp_path / "run"), task="rte", data_dir=str(tmp_path), fsdp=True))
    assert not (tmp_path / "run").exists()


def test_memory_estimate_counts_only_what_is_trained():
    """A causal LM's embeddings and LM head are frozen by default: they carry no diff state, and the estimate
    (what `diffprune train` refuses on) does not count them."""
    from diffprune.families import CAUSAL_LM, get_family
    from diffprune.methods import get_method
    from diffprune.tiny import tiny_causal
    from diffprune.training import TrainConfig

    base = tiny_causal("llama", vocab_size=4000)  # embeddings and LM head: most of this model's entries
    cfg = TrainConfig(output_dir="unused", family=CAUSAL_LM)
    structured = get_method("structured")
    dm = structured.build(base, [], cfg, get_family(CAUSAL_LM))
    need, how = structured.training_state(tiny_causal("llama", vocab_size=4000), [], cfg, get_family(CAUSAL_LM))
    assert need == 36 * dm.n_diffed and f"the {dm.n_diffed:,} diffed parameters" in how
    assert dm.n_diffed < 0.5 * sum(p.numel() for p in base.parameters())


def test_memory_estimate_adds_weights_not_in_memory_and_activations(monkeypatch):
    """The two terms beside the state: weights mapped from their file but not yet in the process's own memory
    (MemAvailable still counts them as free), and activations from the model's shape at the run's batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from diffprune.training import memory

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128))
    size = sum(p.numel() * p.element_size() for p in list(llama.parameters()) + list(llama.buffers()))
    monkeypatch.setattr(memory, "proc_bytes", lambda path, field: 10 if field == "RssAnon" else None)
    assert memory.weights_to_page_in(llama, torch.device("cpu")) == size  # mapped, not resident
    monkeypatch.setattr(memory, "proc_bytes", lambda path, field: 10 * size if field == "RssAnon" else None)
    assert memory.weights_to_page_in(llama, torch.device("cpu")) == 0  # materialised in this process
    cfg = TrainConfig(output_dir="unused", batch_size=2, max_seq_length=256, family="causal-lm")
    per_layer = 68 * 2 * 256 * 64 + 10 * 4 * 256 * 256 * 2
    assert memory.activation_bytes(llama, cfg) == 3 * per_layer + 12 * 2 * 256 * 1000
    ckpt = TrainConfig(output_dir="unused", batch_size=2, max_seq_length=256, family="causal-lm",
                       gradient_checkpointing=True)
    assert memory.activation_bytes(llama, ckpt) == 3 * 4 * 2 * 256 * 64 + per_layer + 12 * 2 * 256 * 1000
    assert memory.activation_bytes(torch.nn.Linear(4, 4), cfg) == 0  # no transformer shape: not estimated


def test_fsdp_trains_bf16_gate_logits_and_diff_values_to_the_one_process_diff(tmp_path, base, glue):
    """bf16 gate logits and diff values (and their moments), rounded stochastically, under two ranks: each
    shard draws the random words the whole tensor draws at its positions (`diffprune.noise.Noise.skip`, tested
    exactly in test_optim.py), so the runs differ only where a gradient summed in another order flips a
    rounding: measured 99.85% of the positions shared (99.64% with every shard drawing from the start)."""
    common = {**RUN, "data_dir": str(glue), "model": str(base), "alpha_dtype": "bf16", "w_dtype": "bf16"}
    train(TrainConfig(output_dir=str(tmp_path / "one"), batch_size=16, **common))
    done = _torchrun({**common, "output_dir": str(tmp_path / "two"), "batch_size": 8})
    assert done.returncode == 0, done.stderr[-4000:]
    a, b = SparseDiff.load(tmp_path / "one"), SparseDiff.load(tmp_path / "two")
    assert a.nnz == b.nnz and b.config.w_dtype == "bf16"
    shared = sum(len(set(a.indices[n].tolist()) & set(b.indices[n].tolist())) for n in a.indices)
    assert shared / a.nnz > 0.99


ENDING = '''
import atexit, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from diffprune.training.distributed import end_process

dist.init_process_group("gloo")
t = distribute_tensor(torch.ones(4, 4), init_device_mesh("cpu", (2,)), [Shard(0)])
assert t.full_tensor().sum().item() == 16
dist.destroy_process_group()
atexit.register(lambda: Path(sys.argv[1], f"teardown{dist.get_rank() if dist.is_initialized() else ''}").touch())
print("written before the end", end="")  # no newline: only a flush gets it out
end_process(7 if len(sys.argv) > 2 else 0)
'''


def test_a_launched_process_ends_without_the_teardown_that_aborts_it(tmp_path):
    """torch 2.13 keeps a gloo group that DTensor used alive after destroy_process_group, and the interpreter's
    teardown around its threads aborted ~1 run in 4 of this script ending 1-10 ms apart (`end_process`): the
    process ends with the given status, its output flushed, and no teardown runs (the atexit mark)."""
    script = tmp_path / "ending.py"
    script.write_text(ENDING)
    for extra, code in (([], 0), (["fail"], 7)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               str(script), str(tmp_path), *extra]
        done = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert (done.returncode == 0) == (code == 0), done.stderr[-3000:]
        if code:
            assert f"exitcode  : {code}" in done.stderr
        assert done.stdout.count("written before the end") == 2
        assert not list(tmp_path.glob("teardown*"))


def test_the_cli_ends_a_launched_process_through_end_process(monkeypatch, capsys):
    from diffprune import cli
    from diffprune.training import distributed

    ended = []

    def fake_end(code):
        ended.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(distributed, "end_process", fake_end)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["inspect", "/nonexistent-diff"]) == 2 and ended == []  # not launched: returns
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        cli.main(["inspect", "/nonexistent-diff"])
    assert ended == [2]

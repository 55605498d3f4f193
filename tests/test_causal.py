"""Causal LMs end to end (issue 17) on tiny random decoder-only models saved as ordinary model folders
(Llama, Qwen2, GPT-2 with tied embeddings) and an offline BPE tokenizer: `diffprune train` picks the
causal-LM family from the data, records it, and `predict`, `merge`, `inspect`, `eval` handle the run;
generation from the trained model equals the merged model's token for token; a diff is refused on the
wrong base. Random weights: nothing here is an accuracy result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .helpers_cli import cli, one_thread, write_jsonl  # noqa: F401  (fixture)
from .tiny_models import QUESTIONS, qa_rows, save_tiny_causal

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_causal("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("qa")
    return write_jsonl(d / "train.jsonl", qa_rows(24)), write_jsonl(d / "val.jsonl", qa_rows(6, offset=1))


def _train(base: Path, out: Path, train_file: Path, val_file: Path, *extra) -> dict:
    cli("train", "--model", base, "--train-file", train_file, "--validation-file", val_file, "--output-dir", out,
        "--method", "structured", "--epochs", 1, "--fixmask-epochs", 1, "--batch-size", 8, "--max-seq-length", 32,
        "--target-sparsity", 0.05, "--lr", 0.05, "--fixmask-lr", 0.05, "--generation-max-new-tokens", 4,
        "--no-progress", *extra)
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, llama_dir, qa_files) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "qa"
    _train(llama_dir, out, *qa_files)
    return out


def _greedy(model, tokenizer, prompt: str, n: int = 6) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_train_picks_the_causal_family_from_the_data_and_records_it(llama_run):
    metrics = json.loads((llama_run / "metrics.json").read_text())
    run = json.loads((llama_run / "run.json").read_text())
    assert metrics["family"] == "causal-lm" and metrics["task_type"] == "generation"
    assert run["task_info"]["family"] == "causal-lm" and run["task_info"]["data_format"] == "prompt_completion"
    assert run["settings"]["family"] == "causal-lm"
    assert set(metrics["final"]) == {"loss", "perplexity", "exact_match"}
    assert metrics["final"]["perplexity"] == pytest.approx(torch.tensor(metrics["final"]["loss"]).exp().item(), rel=1e-5)
    assert 0.0 <= metrics["final"]["exact_match"] <= 1.0
    assert metrics["score"] == pytest.approx(100 * metrics["final"]["exact_match"])
    assert metrics["head_parameters"] == 0  # a causal LM has no new head
    events = [json.loads(x) for x in (llama_run / "train_log.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["train_truncated"] == 0


def test_default_diffs_the_blocks_and_freezes_embeddings_and_lm_head(llama_run, llama_dir):
    from transformers import AutoModelForCausalLM

    from diffprune import SparseDiff

    diff = SparseDiff.load(llama_run)
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    names = dict(base.named_parameters())
    diffed = [n for n in names if diff.config.role_of(n) == "diff"]
    assert "model.embed_tokens.weight" not in diffed and "lm_head.weight" not in diffed
    assert all(".layers." in n or n == "model.norm.weight" for n in diffed)
    n_diffed = sum(names[n].numel() for n in diffed)
    assert diff.n_diffed == n_diffed and diff.nnz == round(0.05 * n_diffed)  # the budget is exact over what is diffed
    assert diff.extra["family"] == "causal-lm" and not diff.head


def test_generation_of_the_loaded_run_equals_the_merged_model_and_predict_streams_it(llama_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from diffprune.runs import load_run

    model, tok, info = load_run(llama_run)
    prompt = "question: is ice hot? answer:"
    ours = _greedy(model, tok, prompt)
    merged_dir = tmp_path / "merged"
    cli("merge", llama_run, "--output-dir", merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # an ordinary causal-LM checkpoint
    assert ours == _greedy(merged, tok, prompt)
    _, out, _ = cli("predict", llama_run, "--prompt", prompt, "--max-new-tokens", 6)
    expect = tok.decode([t for t in ours if t != tok.eos_token_id][: (ours + [tok.eos_token_id]).index(tok.eos_token_id)],
                        skip_special_tokens=True)
    assert out == expect + "\n"
    _, out, _ = cli("predict", llama_run, "--prompt", prompt, "--max-new-tokens", 6, "--json")
    answer = json.loads(out)
    assert answer["text"] == expect and answer["finish_reason"] in ("stop", "length")


def test_predict_stop_string_cuts_the_stream(llama_run):
    from diffprune.runs import load_run

    model, tok, _ = load_run(llama_run)
    for prompt in ("question: is ice hot? answer:", "hello", "the quick brown", "translate to french: cat ->"):
        full = tok.decode(_greedy(model, tok, prompt, 8), skip_special_tokens=True)
        if len(full) >= 4 and "\ufffd" not in full[1:3]:
            break
    else:
        raise AssertionError("no prompt gave a continuation long enough to place a stop string in")
    stop = full[1:3]
    _, out, _ = cli("predict", llama_run, "--prompt", prompt, "--max-new-tokens", 8, "--stop", stop)
    assert out == full[: full.index(stop)] + "\n"
    _, out, _ = cli("predict", llama_run, "--prompt", prompt, "--max-new-tokens", 8, "--stop", stop, "--json")
    assert json.loads(out)["text"] == full[: full.index(stop)] and json.loads(out)["finish_reason"] == "stop"


def test_inspect_and_eval_handle_the_causal_run(llama_run):
    _, out, _ = cli("inspect", llama_run, "--json")
    report = json.loads(out)
    assert report["nnz"] > 0 and report["n_diffed"] > report["nnz"]
    _, out, _ = cli("eval", llama_run)
    result = json.loads(out)
    metrics = json.loads((llama_run / "metrics.json").read_text())
    assert result["metrics"]["loss"] == pytest.approx(metrics["final"]["loss"], rel=1e-5)


def test_a_diff_is_refused_on_another_base(llama_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from diffprune import DiffModel, SparseDiff
    from diffprune.errors import BaseModelMismatchError

    other = save_tiny_causal("llama", tmp_path / "other")
    base = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight.add_(0.01)
    with pytest.raises(BaseModelMismatchError, match="different base model"):
        DiffModel.from_sparse_diff(base, SparseDiff.load(llama_run))


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_other_architectures_train_and_generate_like_their_merge(kind, tmp_path, qa_files):
    from transformers import AutoModelForCausalLM

    from diffprune.runs import load_run

    base = save_tiny_causal(kind, tmp_path / kind)
    extra = ("--target-modules", "**") if kind == "gpt2" else ()  # gpt2: the tied wte / lm_head diffed too
    metrics = _train(base, tmp_path / "run", *qa_files, *extra)
    assert metrics["family"] == "causal-lm"
    model, tok, _ = load_run(tmp_path / "run")
    prompt = "question: is the dog a fish? answer:"
    ours = _greedy(model, tok, prompt)
    merged = model.merge_and_unload().eval()
    assert ours == _greedy(merged, tok, prompt)
    if kind == "gpt2":
        assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # still tied
        names = [n for n, _ in AutoModelForCausalLM.from_pretrained(base).named_parameters()]
        assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # one tensor, diffed once


def test_chat_messages_train_and_predict(tmp_path, llama_dir):
    rows = [{"messages": [{"role": "user", "content": f"{q}?"}, {"role": "assistant", "content": a}]}
            for q, a in QUESTIONS * 3]
    tr = write_jsonl(tmp_path / "chat.jsonl", rows)
    va = write_jsonl(tmp_path / "chat_val.jsonl", rows[:4])
    metrics = _train(llama_dir, tmp_path / "chat", tr, va)
    assert json.loads((tmp_path / "chat" / "run.json").read_text())["task_info"]["data_format"] == "messages"
    assert "exact_match" in metrics["final"]
    conv = write_jsonl(tmp_path / "conv.jsonl", [{"role": "user", "content": "is fire cold?"}])
    code, out, _ = cli("predict", tmp_path / "chat", "--messages", conv, "--max-new-tokens", 4, "--json")
    assert code == 0 and "text" in json.loads(out)


def test_plain_text_trains_with_perplexity_as_its_score(tmp_path, llama_dir):
    rows = [{"text": "the quick brown fox jumps over the lazy dog."}] * 12
    tr, va = write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows[:3])
    metrics = _train(llama_dir, tmp_path / "lm", tr, va)
    assert set(metrics["final"]) == {"loss", "perplexity"} and metrics["score"] == metrics["final"]["perplexity"]


def test_lora_and_full_train_a_causal_lm(tmp_path, llama_dir, qa_files):
    from diffprune.runs import load_run

    for method in ("lora", "full"):
        metrics = _train(llama_dir, tmp_path / method, *qa_files, "--method", method)
        assert metrics["method"] == method and metrics["family"] == "causal-lm"
        model, tok, info = load_run(tmp_path / method)
        assert info["family"] == "causal-lm" and len(_greedy(model, tok, "question: is ice hot? answer:")) >= 1


def test_bad_causal_data_is_refused_before_anything_is_written(tmp_path, llama_dir):
    tr = write_jsonl(tmp_path / "bad.jsonl", qa_rows(3) + [{"prompt": "no completion here"}])
    va = write_jsonl(tmp_path / "val.jsonl", qa_rows(2))
    code, _, err = cli("train", "--model", llama_dir, "--train-file", tr, "--validation-file", va,
                       "--output-dir", tmp_path / "out", "--no-progress", check=False)
    assert code == 2 and "line 4" in err and "completion" in err
    assert not (tmp_path / "out").exists()


def test_lm_data_on_an_encoder_is_refused_with_the_fix(tmp_path, qa_files):
    from .helpers_cli import save_tiny_base

    bert = save_tiny_base(tmp_path / "bert")
    code, _, err = cli("train", "--model", bert, "--train-file", qa_files[0], "--validation-file", qa_files[1],
                       "--output-dir", tmp_path / "out", "--no-progress", check=False)
    assert code == 2 and "not a decoder-only causal LM" in err
    assert not (tmp_path / "out").exists()


def test_cli_train_predict_serve_openai_round_trip(llama_run):
    """The run `diffprune train` wrote, served by `diffprune serve` in-process: the openai client's greedy
    completion and chat answers equal `diffprune predict`'s."""
    import openai

    from diffprune.serving.multitask import MultiTaskModel
    from diffprune.serving.server import create_app

    from .serving_fixtures import live

    prompt = "question: is fire cold? answer:"
    _, expect, _ = cli("predict", llama_run, "--prompt", prompt, "--max-new-tokens", 6)
    app = create_app(MultiTaskModel.from_run_dirs({"qa": llama_run}))
    with live(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["qa"]
        r = client.completions.create(model="qa", prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text + "\n" == expect
        pieces = [c.choices[0].text for c in client.completions.create(model="qa", prompt=prompt, max_tokens=6,
                                                                         temperature=0, stream=True) if c.choices]
        assert "".join(pieces) + "\n" == expect
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt=prompt, max_tokens=2)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_save_load_generate_equals_the_trained_model(kind, tmp_path):
    """A trained DiffModel saved and loaded onto a fresh base generates what it generated before it was
    saved: greedy, and sampling with the same seed (KV cache on)."""
    from transformers import AutoModelForCausalLM

    from diffprune import DiffModel, DiffPruningConfig, SparseDiff
    from diffprune.families import get_family

    folder = save_tiny_causal(kind, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(folder)
    dm = DiffModel(base, DiffPruningConfig(target_sparsity=0.1, **get_family("causal-lm").selection(base, [], None)))
    with torch.no_grad():
        for slot in dm.slots.values():
            slot.w.normal_(0, 0.3)
    dm.project()
    dm.eval()
    prompt = torch.tensor([[5, 17, 42, 99, 7]])
    kw = dict(max_new_tokens=8, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    greedy = dm.generate(prompt, do_sample=False, **kw)
    torch.manual_seed(3)
    sampled = dm.generate(prompt, do_sample=True, temperature=0.8, top_p=0.9, **kw)
    dm.save_pretrained(tmp_path / "run", extra={"family": "causal-lm", "task_type": "generation"})
    loaded = DiffModel.from_sparse_diff(AutoModelForCausalLM.from_pretrained(folder),
                                        SparseDiff.load(tmp_path / "run")).eval()
    assert torch.equal(loaded.generate(prompt, do_sample=False, **kw), greedy)
    torch.manual_seed(3)
    assert torch.equal(loaded.generate(prompt, do_sample=True, temperature=0.8, top_p=0.9, **kw), sampled)

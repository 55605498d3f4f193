"""End to end through the command line: train on a real RTE subset, then eval, predict, inspect, merge;
custom CSV / JSON Lines data; and the one-line errors for bad input."""

import json

import pytest
import torch

from diffprune import SparseDiff

from .helpers_cli import cli, fast_args, glue, one_thread, tiny_base, write_jsonl  # noqa: F401


@pytest.fixture(scope="module")
def rte_run(tmp_path_factory, tiny_base, glue):
    out = tmp_path_factory.mktemp("cli") / "rte"
    torch.set_num_threads(1)
    _, stdout, _ = cli(*fast_args(tiny_base, out, "--task", "rte", "--data-dir", glue, "--max-train-samples", 64,
                                  "--max-eval-samples", 32, "--epochs", 1, "--fixmask-epochs", 1,
                                  "--target-sparsity", 0.02))
    return out, json.loads(stdout)


def test_train_prints_summary_and_writes_the_run(rte_run):
    out, summary = rte_run
    assert summary["task"] == "rte" and summary["method"] == "structured"  # the default method
    diff = SparseDiff.load(out)
    assert summary["nnz"] == diff.nnz == round(0.02 * diff.n_diffed)
    for name in ("diff.safetensors", "diff_config.json", "metrics.json", "train_log.jsonl", "README.md", "run.json"):
        assert (out / name).exists(), name


def test_eval_rescoring_matches_training(rte_run, tmp_path, glue):
    out, summary = rte_run
    _, stdout, _ = cli("eval", out, "--max-samples", 32, "--output", tmp_path / "m.json")
    result = json.loads(stdout)
    assert result["examples"] == 32 and result["metrics"] == summary["final"]
    assert json.loads((tmp_path / "m.json").read_text()) == result
    _, stdout, _ = cli("eval", out, "--data-dir", glue)
    assert json.loads(stdout)["examples"] == 277  # the whole RTE validation set


def test_predict_text_pair_and_file(rte_run, tmp_path):
    out, _ = rte_run
    _, stdout, _ = cli("predict", out, "--text", "A man is playing a guitar.", "--text-pair", "A man plays music.")
    (pred,) = [json.loads(x) for x in stdout.splitlines()]
    assert pred["label"] in ("entailment", "not_entailment")
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0)
    assert pred["label"] == max(pred["probabilities"], key=pred["probabilities"].get)
    f = write_jsonl(tmp_path / "in.jsonl", [{"sentence1": "A man is playing a guitar.", "sentence2": "A man plays music."},
                                            {"sentence1": "b", "sentence2": "c"}])
    _, stdout, _ = cli("predict", out, "--file", f)
    rows = [json.loads(x) for x in stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[0]["probabilities"] == pytest.approx(pred["probabilities"], abs=1e-6)
    code, _, err = cli("predict", out, "--text", "only one", check=False)
    assert code == 2 and "--text-pair" in err


def test_inspect_table_and_plot(rte_run, tmp_path):
    out, summary = rte_run
    png = tmp_path / "density.png"
    _, stdout, _ = cli("inspect", out, "--plot", png)
    assert f"{summary['nnz']:,} nonzeros" in stdout
    for word in ("layer", "attn_query", "ffn", "layernorm", "embeddings", "bias", "full fp32 copy"):
        assert word in stdout
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, stdout, _ = cli("inspect", out, "--json")
    report = json.loads(stdout)
    assert sum(r["nnz"] for r in report["layers"]) == sum(r["nnz"] for r in report["kinds"]) == summary["nnz"]
    assert [r["name"] for r in report["layers"]] == ["no layer", "0", "1"]
    assert report["storage"]["stored_bytes"] == summary["stored_bytes"]


def test_merge_gives_the_same_predictions(rte_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from diffprune.runs import load_run

    out, _ = rte_run
    merged_dir = tmp_path / "merged"
    cli("merge", out, "--output-dir", merged_dir)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    dm, _, _ = load_run(out)
    enc = tok(["A cat sat on the mat.", "Nothing"], ["An animal sat.", "Something else entirely"], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, dm(**enc).logits, rtol=0, atol=1e-6)
    assert merged.config.id2label == {0: "entailment", 1: "not_entailment"}
    code, _, err = cli("merge", out, "--output-dir", merged_dir, check=False)
    assert code == 2 and "already exists" in err


def test_custom_csv_three_classes(tmp_path, tiny_base):
    words = {"pos": ["great", "lovely", "superb"], "neg": ["awful", "boring", "bad"], "mid": ["okay", "average", "fine"]}
    lines = ["review,stars"]
    for i in range(30):
        label = list(words)[i % 3]
        lines.append(f'"a {words[label][i % 3]} film, {i}",{label}')
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "dev.csv").write_text("\n".join(lines[:10]) + "\n", encoding="utf-8")
    out = tmp_path / "reviews"
    _, stdout, _ = cli(*fast_args(tiny_base, out, "--train-file", tmp_path / "train.csv", "--validation-file",
                                  tmp_path / "dev.csv", "--text-columns", "review", "--label-column", "stars",
                                  "--epochs", 1, "--fixmask-epochs", 1, "--target-sparsity", 0.01))
    summary = json.loads(stdout)
    diff = SparseDiff.load(out)
    assert diff.extra["labels"] == ["mid", "neg", "pos"] and diff.extra["task"] == "reviews"
    assert diff.head["classifier.weight"].shape[0] == 3 and summary["nnz"] == round(0.01 * diff.n_diffed)
    assert set(summary["final"]) == {"accuracy", "macro_f1"}
    _, stdout, _ = cli("predict", out, "--text", "a superb film")
    pred = json.loads(stdout)
    assert set(pred["probabilities"]) == {"mid", "neg", "pos"}
    _, stdout, _ = cli("eval", out, "--file", tmp_path / "train.csv")
    assert json.loads(stdout)["examples"] == 30


def test_custom_jsonl_regression(tmp_path, tiny_base):
    rows = [{"a": f"sentence {i}", "b": f"other {i % 4}", "y": round(i / 7, 3)} for i in range(24)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "sim"
    _, stdout, _ = cli(*fast_args(tiny_base, out, "--train-file", tmp_path / "t.jsonl", "--validation-file",
                                  tmp_path / "t.jsonl", "--text-columns", "a", "b", "--label-column", "y",
                                  "--epochs", 1, "--fixmask-epochs", 0, "--method", "structured"))
    assert set(json.loads(stdout)["final"]) == {"pearson", "spearmanr"}
    _, stdout, _ = cli("predict", out, "--text", "sentence 3", "--text-pair", "other 3")
    assert isinstance(json.loads(stdout)["score"], float)


def _fails(*args) -> str:
    code, stdout, err = cli(*args, check=False)
    assert code == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffprune ")
    return lines[0]


def test_bad_input_one_line_errors_and_nothing_overwritten(tmp_path, tiny_base, glue, rte_run):
    run, _ = rte_run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    base = ["train", "--model", tiny_base, "--no-progress"]
    assert "unknown task 'mnli2'" in _fails(*base, "--task", "mnli2", "--data-dir", glue, "--output-dir", tmp_path / "a")
    assert "does not exist" in _fails(*base, "--train-file", tmp_path / "missing.csv", "--validation-file",
                                      tmp_path / "missing.csv", "--text-columns", "t", "--output-dir", tmp_path / "a")
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    assert "is empty" in _fails(*base, "--train-file", empty, "--validation-file", empty, "--text-columns", "t",
                                "--output-dir", tmp_path / "a")
    good = tmp_path / "good.tsv"
    good.write_text("t\tlabel\nx\t0\ny\t1\n", encoding="utf-8")
    msg = _fails(*base, "--train-file", good, "--validation-file", good, "--text-columns", "text",
                 "--output-dir", tmp_path / "a")
    assert "no column 'text'" in msg and "'t', 'label'" in msg
    bad_rte = tmp_path / "glue" / "rte"
    bad_rte.mkdir(parents=True)
    (bad_rte / "train.tsv").write_text("sentence1\tsentence2\tlabel\tidx\na\tb\t0\t0\nc\td\t2\t1\n")
    (bad_rte / "validation.tsv").write_text("sentence1\tsentence2\tlabel\tidx\na\tb\t0\t0\n")
    # --overwrite on an existing run with bad data: the error comes first and the run is untouched
    msg = _fails(*base, "--task", "rte", "--data-dir", tmp_path / "glue", "--output-dir", run, "--overwrite")
    assert "train.tsv, line 3, column 'label'" in msg and "'2' is not a label of task rte" in msg
    stsb = tmp_path / "glue" / "stsb"
    stsb.mkdir()
    (stsb / "train.tsv").write_text("sentence1\tsentence2\tlabel\tidx\na\tb\t4.2\t0\nc\td\tn/a\t1\n")
    (stsb / "validation.tsv").write_text("sentence1\tsentence2\tlabel\tidx\na\tb\t1.0\t0\n")
    msg = _fails(*base, "--task", "stsb", "--data-dir", tmp_path / "glue", "--output-dir", run, "--overwrite")
    assert "line 3, column 'label'" in msg and "'n/a' is not a number" in msg
    latin = tmp_path / "latin.csv"
    latin.write_bytes("t,label\nok,a\nna\xefve,b\n".encode("latin-1"))
    msg = _fails(*base, "--train-file", latin, "--validation-file", latin, "--text-columns", "t",
                 "--output-dir", run, "--overwrite")
    assert "latin.csv, line 3" in msg and "UTF-8" in msg
    msg = _fails(*base, "--task", "rte", "--data-dir", glue, "--output-dir", run)
    assert "already exists; pass --overwrite" in msg
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert "holds no trained model" in _fails("eval", tmp_path)
    assert "no sparse diff" not in _fails("inspect", tmp_path / "nothing-here")


def test_diff_ablation_takes_out_one_kind_at_a_time(rte_run, tmp_path, glue):
    """benchmarks/diff_ablation.py on the trained run: the whole diff rescores as in training, the
    kinds partition the nonzeros, and head-only equals the base with just the head set."""
    import sys

    from diffprune.batching import encode_dataset, pad_id, predict_outputs
    from diffprune.metrics import score_of, task_metrics
    from diffprune.runs import load_base, load_run, read_task_info
    from diffprune.tasks import load_validation, spec_from_info

    from .helpers_cli import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import diff_ablation

    out, summary = rte_run
    diff_ablation.main([str(out), "--data-dir", str(glue), "--max-samples", "32", "--out", str(tmp_path / "abl")])
    (res,) = json.loads((tmp_path / "abl.json").read_text())["results"]
    assert res["score"] == pytest.approx(summary["score"], abs=1e-9) and res["examples"] == 32
    *kinds, head_only = res["ablations"]
    assert {r["removed"] for r in kinds} >= {"embeddings", "ffn", "attn_query"}
    assert sum(r["nnz_removed"] for r in kinds) == res["nnz"] == SparseDiff.load(out).nnz
    assert all(r["change"] == pytest.approx(r["score"] - res["score"]) for r in res["ablations"])

    assert all(r["output_shift"] > 0 for r in res["ablations"])  # every kind's entries were taken out

    info = read_task_info(out)
    spec = spec_from_info(info)
    trained, tok, _ = load_run(out)
    enc = encode_dataset(tok, load_validation(spec, glue, 32), spec.text_columns, int(info["max_seq_length"]))
    whole = predict_outputs(trained, enc, pad_id(tok), 64)
    base, _, _ = load_base(info["base_model"], len(info["labels"]), info["labels"], info["task_type"])
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, t in SparseDiff.load(out).head.items():
            params[name].copy_(t)
    head = predict_outputs(base, enc, pad_id(tok), 64)
    assert head_only["score"] == pytest.approx(score_of(spec, task_metrics(spec, head.tolist(), enc.labels)))
    assert head_only["output_shift"] == pytest.approx(float((head - whole).abs().mean()), rel=1e-5)
    assert "| embeddings |" in (tmp_path / "abl.md").read_text()

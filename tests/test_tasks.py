"""Task specs, GLUE / custom data loading with `datasets`, and the errors for bad data."""

import json

import pytest

from diffprune.tasks import GLUE_TASKS, DataError, load_task, read_texts

from .helpers_cli import glue, one_thread, write_jsonl  # noqa: F401


def test_glue_specs():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert GLUE_TASKS["mnli"].num_labels == 3 and GLUE_TASKS["mnli"].validation_split == "validation_matched"
    assert GLUE_TASKS["stsb"].is_regression and GLUE_TASKS["stsb"].num_labels == 1
    assert GLUE_TASKS["qqp"].text_columns == ("question1", "question2")
    assert GLUE_TASKS["qnli"].text_columns == ("question", "sentence")
    assert GLUE_TASKS["cola"].metrics == ("matthews_correlation",)
    assert GLUE_TASKS["mrpc"].metrics == ("accuracy", "f1")


def test_glue_from_data_dir(glue):
    data = load_task("rte", glue, max_train_samples=50, max_eval_samples=20)
    assert len(data.train) == 50 and len(data.validation) == 20
    assert data.train.column_names == ["sentence1", "sentence2", "labels"]
    first = (glue / "rte" / "train.tsv").read_text(encoding="utf-8").splitlines()[1].split("\t")
    assert data.train[0]["sentence1"] == first[0] and data.train[0]["labels"] == int(first[2])
    stsb = load_task("stsb", glue, max_train_samples=5, max_eval_samples=5)
    assert isinstance(stsb.train[0]["labels"], float) and stsb.spec.is_regression


def test_glue_text_is_never_converted_to_nan(tmp_path):
    task = tmp_path / "sst2"
    task.mkdir()
    rows = "sentence\tlabel\tidx\nNA\t1\t0\nnull\t0\t1\n\"quoted\t1\t2\n"
    (task / "train.tsv").write_text(rows, encoding="utf-8")
    (task / "validation.tsv").write_text(rows, encoding="utf-8")
    data = load_task("sst2", tmp_path)
    assert data.train["sentence"] == ["NA", "null", '"quoted'] and data.train["labels"] == [1, 0, 1]


def test_custom_csv_three_classes_and_jsonl_regression(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text('text,stars\n"good, really",pos\nbad,neg\nmeh,neutral\nfine,pos\n', encoding="utf-8")
    data = load_task(train_file=csv, validation_file=csv, text_columns=["text"], label_column="stars", custom_name="rev")
    assert data.spec.labels == ("neg", "neutral", "pos") and data.spec.task_type == "classification"
    assert data.train["labels"] == [2, 0, 1, 2] and data.train["text"][0] == "good, really"
    assert data.spec.name == "rev" and data.spec.metrics == ("accuracy", "macro_f1")

    rows = [{"a": f"s{i}", "b": f"t{i}", "score": i / 2} for i in range(6)]
    jl = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_task(train_file=jl, validation_file=jl, text_columns=["a", "b"], label_column="score")
    assert data.spec.is_regression and data.train["labels"] == [i / 2 for i in range(6)]

    ints = write_jsonl(tmp_path / "ints.jsonl", [{"t": "x", "label": v} for v in (3, 1, 10, 1)])
    data = load_task(train_file=ints, validation_file=ints, text_columns=["t"])
    assert data.spec.labels == ("1", "3", "10") and data.train["labels"] == [1, 0, 2, 0]


def test_read_texts_for_prediction(tmp_path):
    path = tmp_path / "in.tsv"
    path.write_text("p\th\nA cat.\tAn animal.\nB\tC\n", encoding="utf-8")
    assert read_texts(path, ["p", "h"]) == [["A cat.", "An animal."], ["B", "C"]]


def _err(**kwargs) -> str:
    with pytest.raises(DataError) as e:
        load_task(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors_name_file_line_column_and_fix(tmp_path, glue):
    assert "unknown task 'foo'" in _err(task="foo", data_dir=glue) and "rte" in _err(task="foo", data_dir=glue)
    good = tmp_path / "good.csv"
    good.write_text("text,label\nhi,a\nho,b\n", encoding="utf-8")
    kw = dict(text_columns=["text"], validation_file=good)

    msg = _err(train_file=tmp_path / "nope.csv", **kw)
    assert "nope.csv does not exist" in msg

    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    assert "empty.csv is empty" in _err(train_file=empty, **kw)

    header = tmp_path / "header.csv"
    header.write_text("text,label\n", encoding="utf-8")
    assert "has a header but no examples" in _err(train_file=header, **kw)

    msg = _err(train_file=good, validation_file=good, text_columns=["review"])
    assert "no column 'review'" in msg and "'text', 'label'" in msg and "--text-columns" in msg

    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("text\tlabel\nfine\ta\ncaf\xe9\tb\n".encode("latin-1"))
    msg = _err(train_file=bad, **kw)
    assert "latin1.tsv, line 3" in msg and "not valid UTF-8" in msg and "0xe9" in msg

    val = tmp_path / "val.csv"
    val.write_text("text,label\nx,a\ny,c\n", encoding="utf-8")
    msg = _err(train_file=good, validation_file=val, text_columns=["text"])
    assert "val.csv, line 3, column 'label'" in msg and "'c' is not a label of the training data ('a', 'b')" in msg

    reg = tmp_path / "reg.csv"
    reg.write_text("text,label\nx,0.5\ny,high\nz,2.5\n", encoding="utf-8")
    msg = _err(train_file=reg, validation_file=reg, text_columns=["text"])
    assert "reg.csv, line 3, column 'label'" in msg and "regression" in msg

    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n', encoding="utf-8")
    assert "bad.jsonl, line 2" in _err(train_file=jl, **kw)

    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("text\tlabel\na\tb\tc\n", encoding="utf-8")
    assert "ragged.tsv, line 2" in _err(train_file=ragged, **kw)

    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n", encoding="utf-8")
    assert "at least two different labels" in _err(train_file=one, **kw)


def test_glue_label_errors(tmp_path):
    rte = tmp_path / "rte"
    rte.mkdir()
    (rte / "train.tsv").write_text("sentence1\tsentence2\tlabel\tidx\na\tb\t0\t0\nc\td\t5\t1\n", encoding="utf-8")
    (rte / "validation.tsv").write_text("sentence1\tsentence2\tlabel\tidx\na\tb\t1\t0\n", encoding="utf-8")
    msg = _err(task="rte", data_dir=tmp_path)
    assert "train.tsv, line 3, column 'label'" in msg and "'5' is not a label of task rte" in msg
    stsb = tmp_path / "stsb"
    stsb.mkdir()
    (stsb / "train.tsv").write_text("sentence1\tsentence2\tlabel\tidx\na\tb\t3.8\t0\nc\td\tsimilar\t1\n")
    (stsb / "validation.tsv").write_text("sentence1\tsentence2\tlabel\tidx\na\tb\t1.0\t0\n")
    msg = _err(task="stsb", data_dir=tmp_path)
    assert "line 3" in msg and "'similar' is not a number" in msg and "regression" in msg
    msg = _err(task="cola", data_dir=tmp_path)
    assert "no cola/ folder" in msg
    # names are accepted for GLUE labels, as well as ids
    (rte / "train.tsv").write_text("sentence1\tsentence2\tlabel\tidx\na\tb\tnot_entailment\t0\nc\td\t0\t1\n")
    assert load_task("rte", tmp_path).train["labels"] == [1, 0]
    assert json.dumps(load_task("rte", tmp_path).source)

"""`diffprune.lmdata`: the three causal-LM data shapes, their loss masks, truncation, and the errors
that name file, line and field (offline BPE tokenizer, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffprune.lmdata import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE,
    collate_lm,
    detect_format,
    encode_lm,
    looks_like_lm_file,
    normalise_answer,
    read_lm_file,
    render_prompt,
)
from diffprune.tasks import DataError

from .tiny_models import tiny_tokenizer

GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _loss_text(tok, ids, labels) -> str:
    return tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])


def test_prompt_completion_labels_cover_the_completion_and_eos_only(tmp_path, tok):
    data = read_lm_file(_jsonl(tmp_path / "a.jsonl", [{"prompt": "question: is ice hot? answer:", "completion": " no"}]))
    assert data.format == "prompt_completion" and data.rows[0]["line"] == 1
    enc = encode_lm(tok, data, 64)
    ids, labels = enc.input_ids[0], enc.labels[0]
    n_prompt = len(tok("question: is ice hot? answer:").input_ids)
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert _loss_text(tok, ids, labels) == " no</s>" and ids[-1] == tok.eos_token_id
    assert enc.references == [" no"] and enc.prompts[0] == ids[:n_prompt]


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_hold_prompt_completion_and_text(tmp_path, tok, suffix, sep):
    p = tmp_path / f"pc{suffix}"
    p.write_text(f"prompt{sep}completion\nis fire cold?{sep} no\nis ice cold?{sep} yes\n", encoding="utf-8")
    data = read_lm_file(p)
    assert data.format == "prompt_completion" and [r["completion"] for r in data.rows] == [" no", " yes"]
    assert [r["line"] for r in data.rows] == [2, 3]
    t = tmp_path / f"t{suffix}"
    t.write_text("text\nthe quick brown fox\na lazy dog\n", encoding="utf-8")
    assert detect_format(t) == "text" and looks_like_lm_file(t)
    enc = encode_lm(tok, read_lm_file(t), 64)
    assert enc.labels[0] == enc.input_ids[0] and enc.references == [None, None]


def test_messages_only_assistant_turns_are_in_the_loss_with_the_default_template(tmp_path, tok):
    assert not tok.chat_template
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is fire cold?"},
            {"role": "assistant", "content": "no"}, {"role": "user", "content": "and ice?"},
            {"role": "assistant", "content": "cold"}]
    data = read_lm_file(_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))
    enc = encode_lm(tok, data, 256)
    ids, labels = enc.input_ids[0], enc.labels[0]
    rendered = tok.apply_chat_template(msgs, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)
    assert tok.decode(ids) == rendered
    assert _loss_text(tok, ids, labels) == "no</s>\ncold</s>\n"
    assert enc.references == ["cold"]
    # the prompt generation continues is the training text up to the last assistant's content
    prompt = render_prompt(tok, messages=msgs[:4])
    assert ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("<|assistant|>\n")


def test_messages_use_the_tokenizers_own_chat_template(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                         "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    enc = encode_lm(tok, read_lm_file(_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])), 128)
    assert tok.decode(enc.input_ids[0]) == "[user] hi\n[assistant] hello</s>\n"
    assert _loss_text(tok, enc.input_ids[0], enc.labels[0]) == "hello</s>\n"
    assert tok.decode(render_prompt(tok, messages=msgs[:1])) == "[user] hi\n[assistant] "


def test_truncation_is_counted_and_rows_with_nothing_left_are_dropped(tmp_path, tok):
    rows = [{"prompt": "a " * 30, "completion": " b"}, {"prompt": "a", "completion": " b c d e f g h i j k l"},
            {"prompt": "x", "completion": " y"}]
    enc = encode_lm(tok, read_lm_file(_jsonl(tmp_path / "t.jsonl", rows)), 12)
    assert enc.dropped == 1 and enc.truncated == 2 and len(enc) == 2
    assert max(enc.lengths()) == 12 and enc.lines == [2, 3]


def test_collate_right_pads_with_ignored_labels(tmp_path, tok):
    rows = [{"prompt": "q", "completion": " yes"}, {"prompt": "a longer question", "completion": " no"}]
    enc = encode_lm(tok, read_lm_file(_jsonl(tmp_path / "c.jsonl", rows)), 64)
    b = collate_lm(enc, [0, 1], tok.pad_token_id)
    n0, n1 = enc.lengths()
    assert b["input_ids"].shape == (2, max(n0, n1)) and b["attention_mask"][0].sum() == n0
    assert torch.all(b["labels"][0, n0:] == IGNORE) and torch.all(b["input_ids"][0, n0:] == tok.pad_token_id)
    assert b["labels"][1].tolist() == enc.labels[1]


@pytest.mark.parametrize("rows,needle", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "b"}, {"prompt": "c"}], "line 3: no field 'completion'"),
    ([{"prompt": "a", "completion": "   "}], "line 1: field 'completion' is empty"),
    ([{"prompt": "a", "completion": 3}], "line 1: field 'completion' must be a string"),
    ([{"text": ""}], "line 1: field 'text' is empty"),
    ([{"messages": "hi"}], "line 1: field 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], "role 'robot'; the roles are system, user, assistant"),
    ([{"messages": [{"role": "user"}]}], "message 1 needs \"role\" and \"content\""),
    ([{"messages": [{"role": "user", "content": "x"}]}], "no assistant turn"),
    ([{"question": "a"}], "needs \"prompt\" \\+ \"completion\", \"messages\" or \"text\""),
    (["{not json"], "line 1: not valid JSON"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, rows, needle):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=needle) as e:
        read_lm_file(path)
    assert str(path) in str(e.value)


def test_non_utf8_empty_and_csv_messages_are_refused(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="line 2: byte .* is not valid UTF-8"):
        read_lm_file(p)
    e = tmp_path / "empty.jsonl"
    e.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_lm_file(e)
    c = tmp_path / "m.csv"
    c.write_text("messages\nx\n")
    with pytest.raises(DataError, match="chat messages need JSON Lines"):
        read_lm_file(c)


def test_validation_must_have_the_training_shape(tmp_path):
    p = _jsonl(tmp_path / "v.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="holds text rows, the run trains on prompt_completion rows"):
        read_lm_file(p, "validation file", fmt="prompt_completion")


def test_classification_files_do_not_look_like_lm_data(tmp_path):
    if (GLUE / "sst2" / "train.tsv").exists():
        assert not looks_like_lm_file(GLUE / "sst2" / "train.tsv")
    assert not looks_like_lm_file(_jsonl(tmp_path / "cls.jsonl", [{"text": "good", "label": 1}]))
    assert looks_like_lm_file(_jsonl(tmp_path / "lm.jsonl", [{"messages": []}]))
    assert not looks_like_lm_file(tmp_path / "missing.jsonl")


def test_normalise_answer():
    assert normalise_answer("  Yes \n\tSIR ") == "yes sir"

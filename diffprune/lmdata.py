"""The data of causal-LM finetuning: JSON Lines (or CSV/TSV) rows in one of three shapes.

* ``prompt`` + ``completion`` (format "prompt_completion"): the model reads prompt + completion + EOS;
  the loss covers the completion and the EOS only.
* ``messages`` (format "messages", JSON Lines only): a chat, ``[{"role": "system" | "user" |
  "assistant", "content": "..."}, ...]``, rendered with the tokenizer's chat template, or with
  `DEFAULT_CHAT_TEMPLATE` when it has none; the loss covers the assistant turns only (their content
  and what the template writes after it, e.g. the end-of-turn token).
* ``text`` (format "text"): plain language modelling, every token (and a final EOS) in the loss.

Every row is checked before any model work; a bad one is a `DataError` naming the file, the line and
the field. Rows are cut at --max-seq-length (counted as ``truncated``); a row left with no loss token
is dropped (counted as ``dropped``). For validation, the completion (or the last assistant turn) is the
reference that greedy generation is scored against (exact match after `normalise_answer`)."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tasks import DataError, _decoded_lines, _where, json_objects

FORMATS = ("prompt_completion", "messages", "text")
ROLES = ("system", "user", "assistant")
IGNORE = -100
"""The label of tokens outside the loss (transformers' ignore index)."""

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The chat template of tokenizers that have none: <|system|> / <|user|> / <|assistant|> headers, each
turn on its own lines, EOS after every assistant turn (so the model learns to stop)."""

_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclass
class LMData:
    format: str
    rows: list[dict]
    """Normalised rows: {"prompt", "completion"} / {"messages"} / {"text"}, each with its "line"."""
    path: str

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class LMEncoded:
    input_ids: list[list[int]]
    labels: list[list[int]]
    """Per token: the token id where it is in the loss, else -100."""
    references: list[str | None]
    """The reference completion of each row (None for plain text)."""
    prompts: list[list[int]]
    """Token ids of each row's prompt (what generation continues), [] for plain text."""
    truncated: int = 0
    dropped: int = 0
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


# ---- reading ---------------------------------------------------------------------------------------
def _kind(path: Path) -> str:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix or '(no extension)'!r}; use .jsonl, .csv or .tsv")
    return kind


def _raw_rows(path: Path, what: str):
    """(line, dict) for every row of a JSON Lines, CSV or TSV file."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise DataError(f"{what} {path} is a directory; give a .jsonl, .csv or .tsv file")
    kind = _kind(path)
    if kind == "jsonl":
        yield from json_objects(path)
        return
    lines = list(_decoded_lines(path))
    reader = csv.reader(io.StringIO("\n".join(t for _, t in lines)), delimiter="\t" if kind == "tsv" else ",")
    header = None
    for fields in reader:
        n = lines[min(reader.line_num, len(lines)) - 1][0]
        if header is None:
            header = [h.strip() for h in fields]
            if "messages" in header:
                raise DataError(f"{_where(path, n)}: chat messages need JSON Lines (one {{\"messages\": [...]}} per "
                                "line); CSV/TSV holds prompt + completion or text columns")
            continue
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise DataError(f"{_where(path, n)}: {len(fields)} fields, the header has {len(header)}")
        yield n, dict(zip(header, fields))


def _shape(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row and "label" not in row:
        return "text"
    return None


def looks_like_lm_file(path) -> bool:
    """Whether a file's first row has the fields of a causal-LM shape (and no ``label``)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in _SUFFIXES:
        return False
    try:
        for _, row in _raw_rows(path, "file"):
            return _shape(row) is not None
    except (DataError, OSError):
        return False
    return False


def detect_format(path) -> str:
    path = Path(path)
    for n, row in _raw_rows(path, "file"):
        fmt = _shape(row)
        if fmt is None:
            raise DataError(f"{_where(path, n)}: a row needs \"prompt\" + \"completion\", \"messages\" or \"text\" "
                            f"(its fields are {', '.join(map(repr, row))})")
        return fmt
    raise DataError(f"{path} is empty; it needs at least one row")


def _string(path, n, row, key, allow_empty=False) -> str:
    if key not in row:
        raise DataError(f"{_where(path, n)}: no field {key!r} (the file's rows are "
                        f"{'prompt + completion' if key in ('prompt', 'completion') else key})")
    v = row[key]
    if not isinstance(v, str):
        raise DataError(f"{_where(path, n)}: field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{_where(path, n)}: field {key!r} is empty; there is nothing to learn from it")
    return v


def _messages(path, n, row) -> list[dict]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{_where(path, n)}: field 'messages' must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{_where(path, n)}: field 'messages', message {i} needs \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise DataError(f"{_where(path, n)}: field 'messages', message {i} has role {m['role']!r}; the roles are "
                            f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{_where(path, n)}: field 'messages', message {i}: content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataError(f"{_where(path, n)}: field 'messages' has no assistant turn with content; there is nothing "
                        "to learn (or score) in it")
    return out


def read_lm_file(path, what: str = "training file", fmt: str | None = None, max_rows: int | None = None) -> LMData:
    """Read and check every row of a causal-LM data file; `fmt` requires a shape (validation: training's)."""
    path = Path(path)
    found = detect_format(path) if path.is_file() else None
    if found is None:
        list(_raw_rows(path, what))  # raises the missing / directory error
        raise DataError(f"{what} {path} is empty; it needs at least one row")
    if fmt is not None and found != fmt:
        raise DataError(f"{what} {path} holds {found} rows, the run trains on {fmt} rows; give a file of that shape")
    rows = []
    for n, row in _raw_rows(path, what):
        if max_rows is not None and len(rows) >= max_rows:
            break
        if found == "prompt_completion":
            rows.append({"prompt": _string(path, n, row, "prompt", allow_empty=True),
                         "completion": _string(path, n, row, "completion"), "line": n})
        elif found == "messages":
            rows.append({"messages": _messages(path, n, row), "line": n})
        else:
            rows.append({"text": _string(path, n, row, "text"), "line": n})
    if not rows:
        raise DataError(f"{what} {path} has no rows")
    return LMData(found, rows, str(path))


# ---- tokenising ---------------------------------------------------------------------------------------
def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors, e.g. a template that refuses a role order
        raise DataError(f"the chat template cannot render these messages ({type(e).__name__}: {e})") from None


def _chat_segments(tokenizer, messages, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, in the loss) pieces: each assistant turn is its own piece.

    Built by rendering growing prefixes of the conversation, which a template must extend (every
    common one does); the pieces then tokenise exactly like the training text."""
    pieces, prev = [], ""
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            head = _render(tokenizer, messages[:k], True) if k else _render(tokenizer, [], True)
            full = _render(tokenizer, messages[: k + 1], False)
            if not head.startswith(prev) or not full.startswith(head):
                raise DataError("the tokenizer's chat template does not render a conversation as a growing prefix; "
                                "its assistant turns cannot be located for the loss")
            pieces += [(head[len(prev):], False), (full[len(head):], True)]
        else:
            full = _render(tokenizer, messages[: k + 1], False)
            if not full.startswith(prev):
                raise DataError("the tokenizer's chat template does not render a conversation as a growing prefix; "
                                "its assistant turns cannot be located for the loss")
            pieces.append((full[len(prev):], False))
        prev = full
    if add_generation_prompt:
        head = _render(tokenizer, messages, True)
        pieces.append((head[len(prev):], False))
    return [(t, loss) for t, loss in pieces if t]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def render_prompt(tokenizer, *, prompt: str | None = None, messages: list | None = None) -> list[int]:
    """Token ids that generation continues: the tokenised prompt (with the tokenizer's own special
    tokens, e.g. BOS), or the conversation rendered by the chat template with the assistant header."""
    if (prompt is None) == (messages is None):
        raise ValueError("give prompt or messages")
    if prompt is not None:
        return list(tokenizer(prompt).input_ids)
    return [t for text, _ in _chat_segments(tokenizer, messages, add_generation_prompt=True)
            for t in _ids(tokenizer, text)]


def _encode_row(tokenizer, fmt: str, row: dict) -> tuple[list[int], list[int], str | None, list[int]]:
    if fmt == "prompt_completion":
        p = render_prompt(tokenizer, prompt=row["prompt"])
        c = _ids(tokenizer, row["completion"]) + _eos(tokenizer)
        return p + c, [IGNORE] * len(p) + c, row["completion"], p
    if fmt == "text":
        ids = list(tokenizer(row["text"]).input_ids) + _eos(tokenizer)
        return ids, list(ids), None, []
    msgs = row["messages"]
    ids, labels = [], []
    for text, in_loss in _chat_segments(tokenizer, msgs):
        t = _ids(tokenizer, text)
        ids += t
        labels += t if in_loss else [IGNORE] * len(t)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return ids, labels, msgs[last]["content"], render_prompt(tokenizer, messages=msgs[:last])


def encode_lm(tokenizer, data: LMData, max_seq_length: int) -> LMEncoded:
    """Tokenise every row with its loss labels, cut at `max_seq_length` (prompt first)."""
    enc = LMEncoded([], [], [], [])
    for row in data.rows:
        ids, labels, ref, prompt = _encode_row(tokenizer, data.format, row)
        if len(ids) > max_seq_length:
            enc.truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if all(x == IGNORE for x in labels[1:]):  # the first token is never predicted
            enc.dropped += 1
            continue
        enc.input_ids.append(ids)
        enc.labels.append(labels)
        enc.references.append(ref)
        enc.prompts.append(prompt)
        enc.lines.append(row["line"])
    return enc


def collate_lm(enc: LMEncoded, indices, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids (pad id), attention_mask, labels (-100 on padding)."""
    indices = list(indices)
    width = max(len(enc.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(enc.input_ids[i])
        ids[row, :n] = torch.tensor(enc.input_ids[i], dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(enc.labels[i], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def normalise_answer(text: str) -> str:
    """Whitespace collapsed, stripped and lowercased: what exact match compares."""
    return re.sub(r"\s+", " ", text).strip().lower()

"""Text generation helpers shared by the server, `diffprune predict` and exact-match validation: stop
strings, cancellation, and a streamer whose pieces add up to exactly the non-streamed text.

* `StopOnStrings`  a ``StoppingCriteria`` that stops a row once its decoded completion contains a stop
                   string (the same decode and search that cut the returned text, so the two agree).
* `StopOnCancel`   stops every row once a ``threading.Event`` is set (a client went away).
* `TextDeltaStreamer`  a ``TextIteratorStreamer`` that decodes the whole completion at every token and
                   hands out only the new text that can no longer change: text after a stop string is
                   never sent, a tail that may be the start of a stop string or an incomplete UTF-8
                   character waits for the next token. ``TextStreamer``'s own chunking (a cache reset at
                   each newline, words held until a space) can decode differently from the whole
                   completion; decoding the whole completion cannot.
* `finish`         the returned text of a completion: decoded without special tokens, cut at the first
                   stop string.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria, TextIteratorStreamer

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


def decode(tokenizer, ids: Sequence[int], lock: threading.Lock | None = None) -> str:
    """The text of generated tokens (special tokens skipped). `lock`: the tokenizer's lock (a fast
    tokenizer that another thread is configuring for an encode raises "Already borrowed")."""
    if lock is None:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    with lock:
        return tokenizer.decode(list(ids), skip_special_tokens=True)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one occurred."""
    best = -1
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return (text[:best], True) if best >= 0 else (text, False)


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of `text` may still change or become part of a stop string: the
    longest tail that is a proper prefix of a stop string, or trailing replacement characters (an
    incomplete UTF-8 sequence that the next byte token completes)."""
    keep = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    tail = len(text) - len(text.rstrip(REPLACEMENT))
    return max(keep, tail)


class StopOnStrings(StoppingCriteria):
    """Stop each row once its completion (tokens after the prompt, decoded as the answer is) contains
    a stop string; `done_at[row]` is the sequence length at which it did."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int, eos: set[int],
                 lock: threading.Lock | None = None):
        self.tokenizer, self.stop, self.prompt_len, self.eos, self.lock = tokenizer, list(stop), prompt_len, eos, lock
        self.done_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        rows = input_ids[:, self.prompt_len :].tolist()
        out = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for r, ids in enumerate(rows):
            if r in self.done_at:
                out[r] = True
                continue
            if any(t in self.eos for t in ids):  # finished by EOS: the rest is padding
                continue
            if cut_at_stop(decode(self.tokenizer, ids, self.lock), self.stop)[1]:
                self.done_at[r] = input_ids.shape[1]
                out[r] = True
        return out


class StopOnCancel(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextDeltaStreamer(TextIteratorStreamer):
    """Streams the text of one completion (batch size 1) as it is generated; the pieces concatenated
    equal the non-streamed answer's text (special tokens skipped, cut at the first stop string).

    Iterate it (``for piece in streamer``, as ``TextIteratorStreamer``) or pass `callback`, called
    with each piece and with None at the end, from the generating thread. `lock` guards the tokenizer
    (`MultiTaskModel.streamer` passes the model's)."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), callback: Callable[[str | None], None] | None = None,
                 timeout: float | None = None, lock: threading.Lock | None = None):
        super().__init__(tokenizer, skip_prompt=True, timeout=timeout)
        self.stop = list(stop)
        self.callback = callback
        self.lock = lock
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False

    def put(self, value) -> None:
        if len(value.shape) > 1 and value.shape[0] > 1:
            raise ValueError("TextDeltaStreamer streams one completion at a time (batch size 1)")
        if len(value.shape) > 1:
            value = value[0]
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.ids.extend(value.tolist())
        text, stopped = cut_at_stop(decode(self.tokenizer, self.ids, self.lock), self.stop)
        safe = text if stopped else text[: len(text) - held_back(text, self.stop)]
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            piece, self.sent = safe[len(self.sent) :], safe
            self.on_finalized_text(piece)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        text = self.final_text()
        if not text.startswith(self.sent):  # cannot happen with prefix-stable decoding; say so if it does
            log.warning("streamed text %r is not a prefix of the completion %r", self.sent, text)
        elif len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent) :], text
            self.on_finalized_text(piece)
        self.on_finalized_text("", stream_end=True)

    def final_text(self) -> str:
        return cut_at_stop(decode(self.tokenizer, self.ids, self.lock), self.stop)[0]

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.callback is None:
            super().on_finalized_text(text, stream_end)
            return
        if text:
            self.callback(text)
        if stream_end:
            self.callback(None)

"""Tokenising once, dynamic padding per batch, and batched inference (fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """Tokenised examples: token id lists (no padding) and, when known, labels."""

    features: dict[str, list[list[int]]]
    labels: list | None = None

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    def lengths(self) -> list[int]:
        return [len(x) for x in self.features["input_ids"]]


def encode_texts(tokenizer, rows: list[list[str]], max_seq_length: int, labels=None) -> Encoded:
    """Tokenise rows of one or two texts, truncated to `max_seq_length` tokens, unpadded."""
    if not rows:
        return Encoded({"input_ids": []}, [] if labels is not None else None)
    n_texts = len(rows[0])
    first = [r[0] for r in rows]
    second = [r[1] for r in rows] if n_texts == 2 else None
    enc = tokenizer(first, second, truncation=True, max_length=max_seq_length, padding=False)
    keep = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return Encoded({k: list(enc[k]) for k in keep}, list(labels) if labels is not None else None)


def encode_dataset(tokenizer, ds, text_columns, max_seq_length: int) -> Encoded:
    """A task dataset (text columns + ``labels``) tokenised."""
    rows = [list(r) for r in zip(*(ds[c] for c in text_columns))]
    labels = ds["labels"] if "labels" in ds.column_names else None
    return encode_texts(tokenizer, rows, max_seq_length, labels)


def collate(encoded: Encoded, indices, pad_token_id: int, regression: bool = False) -> dict[str, torch.Tensor]:
    """A batch padded to its own longest example (dynamic padding)."""
    indices = list(indices)
    width = max(len(encoded.features["input_ids"][i]) for i in indices)
    batch = {}
    for key, seqs in encoded.features.items():
        pad = pad_token_id if key == "input_ids" else 0
        t = torch.full((len(indices), width), pad, dtype=torch.long)
        for row, i in enumerate(indices):
            s = seqs[i]
            t[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        batch[key] = t
    if "attention_mask" not in batch:
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            mask[row, : len(encoded.features["input_ids"][i])] = 1
        batch["attention_mask"] = mask
    if encoded.labels is not None:
        vals = [encoded.labels[i] for i in indices]
        batch["labels"] = torch.tensor(vals, dtype=torch.float32 if regression else torch.long)
    return batch


def pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0


@torch.no_grad()
def predict_outputs(model, encoded: Encoded, pad_token_id: int, batch_size: int = 64, indices=None,
                    device=None) -> torch.Tensor:
    """Logits (or regression scores) in fp32 for `encoded` (or its `indices`), in input order.

    Examples are run sorted by length so that padding is minimal; the model is put in eval mode.
    """
    model.eval()
    order = list(range(len(encoded))) if indices is None else list(indices)
    if not order:
        return torch.zeros(0)
    lengths = encoded.lengths()
    by_len = sorted(order, key=lambda i: lengths[i])
    chunks = {}
    for start in range(0, len(by_len), batch_size):
        idx = by_len[start : start + batch_size]
        batch = collate(encoded, idx, pad_token_id)
        batch.pop("labels", None)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits.float().cpu()
        for row, i in enumerate(idx):
            chunks[i] = logits[row]
    return torch.stack([chunks[i] for i in order])

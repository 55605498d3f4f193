"""Validation of causal LMs: token-weighted loss and perplexity over the loss tokens, and exact match of
greedy generations against the reference completions (whitespace and case normalised), and the greedy
generation that `diffprune predict` and the exact-match score share.

Several processes each score their share of the rows (`lm_partial_metrics`) and `combine_lm_metrics`
adds the sums up, so the result does not depend on the number of processes."""

from __future__ import annotations

import math

import torch


def generate(model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, device=None, streamer=None, stop: list[str] | None = None) -> dict:
    """One prompt's continuation: {"text", "token_ids", "finish_reason" ("stop" | "length")}.

    Greedy when `temperature` is 0 (KV cache on). Generation ends at the tokenizer's EOS or at a stop
    string (the text is cut before it). `streamer` is a transformers streamer fed as tokens come."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    kwargs = {"max_new_tokens": int(max_new_tokens), "attention_mask": torch.ones_like(ids),
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    if streamer is not None:
        kwargs["streamer"] = streamer
    model.eval()
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    finish = "length"
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
        finish = "stop"
    text = tokenizer.decode(new, skip_special_tokens=True)
    for s in stop or ():
        if s and s in text:
            text, finish = text[: text.index(s)], "stop"
    return {"text": text, "token_ids": new, "finish_reason": finish}


@torch.no_grad()
def lm_partial_metrics(model, enc, tokenizer, indices, *, batch_size: int, pad_token_id: int, device,
                       max_new_tokens: int) -> dict:
    """Sums over this process's rows: loss over the loss tokens, their count, exact matches."""
    from .lmdata import collate_lm, normalise_answer

    model.eval()
    loss_sum, tokens = 0.0, 0
    order = sorted(indices, key=lambda i: len(enc.input_ids[i]))
    for start in range(0, len(order), batch_size):
        batch = collate_lm(enc, order[start : start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        target = labels[:, 1:]
        loss_sum += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"))
        tokens += int((target != -100).sum())
    correct = total = 0
    for i in indices:
        ref = enc.references[i]
        if ref is None:
            continue
        out = generate(model, tokenizer, enc.prompts[i], max_new_tokens=max_new_tokens, device=device)
        correct += int(normalise_answer(out["text"]) == normalise_answer(ref))
        total += 1
    return {"loss_sum": loss_sum, "tokens": tokens, "em_correct": correct, "em_total": total}


def combine_lm_metrics(parts: list[dict]) -> dict:
    """{"loss", "perplexity"[, "exact_match"]} from every process's sums."""
    loss_sum = sum(p["loss_sum"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    loss = loss_sum / max(tokens, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    total = sum(p["em_total"] for p in parts)
    if total:
        out["exact_match"] = sum(p["em_correct"] for p in parts) / total
    return out

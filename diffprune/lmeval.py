"""Validation of causal LMs: token-weighted loss and perplexity over the loss tokens, and exact match of
greedy generations against the reference completions (whitespace and case normalised), and the one-prompt
generation that `diffprune predict` and the exact-match score share.

Several processes each score their share of the rows (`lm_partial_metrics`) and `combine_lm_metrics`
adds the sums up, so the result does not depend on the number of processes."""

from __future__ import annotations

import math

import torch


def generate(model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, device=None, streamer=None, stop: list[str] | None = None) -> dict:
    """One prompt's continuation: {"text", "token_ids" (before EOS), "finish_reason" ("stop" | "length"),
    "completion_tokens" (generated, EOS included: as the server counts them)}.

    Greedy when `temperature` is 0 (KV cache on). Generation ends at the tokenizer's EOS or at a stop
    string, found and cut as the server does (`diffprune.generation`). `streamer`: e.g. a
    `generation.TextDeltaStreamer`, fed as tokens come."""
    from transformers import StoppingCriteriaList

    from .generation import StopOnStrings, cut_at_stop, decode

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    stop = [s for s in (stop or []) if s]
    criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop, ids.shape[1], eos)] if stop else [])
    kwargs = {"max_new_tokens": int(max_new_tokens), "attention_mask": torch.ones_like(ids), "use_cache": True,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
              "stopping_criteria": criteria, "streamer": streamer}
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    model.eval()
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    generated = len(new)
    finish = "length"
    if eos and any(t in eos for t in new):
        new = new[: next(k for k, t in enumerate(new) if t in eos)]
        finish = "stop"
    text, stopped = cut_at_stop(decode(tokenizer, new), stop)
    return {"text": text, "token_ids": new, "finish_reason": "stop" if stopped else finish,
            "completion_tokens": generated}


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

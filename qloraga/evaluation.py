"""Held-out loss and exact-match accuracy: the numbers a user compares before and after fine-tuning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qloraga.batches import IGNORE, Collator, Example
from qloraga.formats import encode_prompt, prompt_and_answer, resolve_format
from qloraga.loading import model_device


@torch.no_grad()
def held_out_loss(model: nn.Module, examples: Sequence[Example], collator: Collator, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over the response tokens of `examples`."""
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collator(examples[i:i + batch_size]).items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # packed rows: position ids, no mask
        logits = model(**inputs, use_cache=False).logits.float()  # no cache: packed rows need none (batches.pack)
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum")
        total += loss.item()
        count += (labels != IGNORE).sum().item()
    return total / max(count, 1)


SHORT_ANSWER_FORMATS = ("prompt-completion", "alpaca")
SHORT_ANSWER_TOKENS = 32  # longer answers (prose, chat turns) have no single right text to match


def scored_pairs(records: Sequence[dict[str, Any]], fmt: str, tokenizer,
                 max_samples: int) -> list[tuple[list[int], str]]:
    """(prompt ids, expected answer) of the records exact match can score: none for text and chat data, and none
    when any answer is longer than SHORT_ANSWER_TOKENS (generating that long per record is a long wait for a
    score that means nothing)."""
    record_fmt = resolve_format(records, fmt)
    if max_samples == 0 or record_fmt not in SHORT_ANSWER_FORMATS:
        return []
    pairs = [(encode_prompt(tokenizer, prompt, record_fmt), answer.strip())
             for prompt, answer in (prompt_and_answer(r, record_fmt, tokenizer) for r in records[:max_samples])]
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pairs]
    return pairs if lengths and max(lengths) <= SHORT_ANSWER_TOKENS else []


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer, records: Sequence[dict[str, Any]], fmt: str, *,
                max_samples: int = 200, batch_size: int = 16, progress: bool = True) -> float | None:
    """Share of records whose greedy answer, stripped, equals the expected answer; None where that means nothing
    (see `scored_pairs`) or `max_samples` is 0."""
    pairs = scored_pairs(records, fmt, tokenizer, max_samples)
    if not pairs:
        return None
    max_new = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pairs) + 2
    answers = greedy_answers(model, tokenizer, [p for p, _ in pairs], max_new, batch_size=batch_size,
                             progress=progress)
    return sum(text.strip() == answer for text, (_, answer) in zip(answers, pairs, strict=True)) / len(pairs)


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, *,
                   batch_size: int = 16, progress: bool = False) -> list[str]:
    """The greedy continuation of each prompt (token ids), decoded without special tokens."""
    model.eval()
    device = model_device(model)
    pad = tokenizer.pad_token_id
    texts = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):  # left padding, so generation continues every prompt
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return texts

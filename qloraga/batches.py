"""Examples and batches: records tokenized with response-only labels and truncated (`tokenize`), packed into
rows (`pack`), and collated into the batches both the LoRA-GA estimator and the Trainer use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from qloraga.errors import DataError
from qloraga.formats import CHAT_FORMATS, check_record, count_empty_responses, render, resolve_format, uses_bos

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # packed rows only (`pack`): positions restart at each sample


@dataclass
class TokenizeReport:
    examples: int
    truncated: int
    fully_masked: int


def tokenize(records: Sequence[dict[str, Any]], fmt: str, tokenizer, seq_len: int) -> tuple[list[Example],
                                                                                           TokenizeReport]:
    """Token ids with labels on response tokens only (IGNORE elsewhere); an EOS closes each example."""
    examples, truncated, masked = [], 0, 0
    record_fmt = resolve_format(records, fmt)
    for index, record in enumerate(records):
        check_record(record, record_fmt, index)
    count_empty_responses(records, record_fmt)
    for record in records:
        ids: list[int] = []
        labels: list[int] = []
        if uses_bos(tokenizer, record_fmt):
            ids, labels = [tokenizer.bos_token_id], [IGNORE]
        for text, trained in render(record, record_fmt, tokenizer):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        if record_fmt not in CHAT_FORMATS and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        if all(label == IGNORE for label in labels[1:]):
            masked += 1
            continue
        examples.append(Example(ids, labels))
    if not examples:
        raise DataError(f"Every one of the {len(records)} examples has all its labels masked (responses empty "
                        f"or cut off by --seq-len {seq_len}): raise --seq-len or check the response fields.")
    return examples, TokenizeReport(len(examples), truncated, masked)


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Concatenate whole examples into rows of at most `seq_len` tokens (first fit, in order).

    Each row carries position ids that restart at 0 for every sample. Given those and no attention mask,
    transformers builds a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`), so a
    packed sample sees only itself at the positions it has unpacked. The label of each sample's first token
    is masked: unpacked, nothing predicts it; packed, the previous sample's last token would. A forward pass on
    packed rows must not use a KV cache (`use_cache=False`, as the Trainer and our evaluation do): with one,
    transformers skips the per-sample mask. Only families whose mask reads the position ids keep the samples
    apart (`preflight.check_packing`)."""
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > seq_len:
            rows.append(Example(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids += ex.input_ids  # extended in place: linear in the row's length
        labels += [IGNORE, *ex.labels[1:]]
        positions += range(len(ex.input_ids))
    if ids:
        rows.append(Example(ids, labels, positions))
    return rows


class Collator:
    """Right-pads a list of examples (dicts or `Example`) into `input_ids`, `attention_mask`, `labels`.

    Packed rows (with `position_ids`) get `position_ids` instead of an attention mask: the padding is one
    more sample (positions from 0, labels masked) that no real token attends to."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Any]) -> dict[str, torch.Tensor]:
        rows = [f if isinstance(f, dict) else asdict(f) for f in features]
        packed = [bool(r.get("position_ids")) for r in rows]
        if any(packed) and not all(packed):
            raise ValueError("A batch mixes packed rows (with position_ids) and plain ones: pack all or none.")
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
            if r.get("position_ids"):
                positions[i, :n] = torch.tensor(r["position_ids"])
                positions[i, n:] = torch.arange(width - n)
        if all(packed):
            return {"input_ids": ids, "position_ids": positions, "labels": labels}
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def gradient_batches(examples: Sequence[Example], n_batches: int, batch_size: int,
                     collator: Collator) -> list[dict[str, torch.Tensor]]:
    """The first `n_batches` batches of the training examples, in order (deterministic, cacheable)."""
    n = min(len(examples), n_batches * batch_size)
    return [collator(examples[i:i + batch_size]) for i in range(0, n, batch_size)]

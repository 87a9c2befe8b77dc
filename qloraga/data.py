"""Datasets: read records, render each format to (prompt, response) text, tokenize with response-only
labels, truncate, pack, and collate into the batches both the LoRA-GA estimator and the Trainer use.

Formats (one example record each):
- `prompt-completion`: {"prompt": "2 + 2 =", "completion": " 4"}
- `alpaca`: {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}
- `messages`: {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
  rendered with the tokenizer's chat template; loss on assistant turns only.
- `sharegpt`: {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}: the same
  as `messages` (roles human/user, gpt/assistant, system).
- `text`: {"text": "Any raw text."}: loss on every token.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from jinja2 import TemplateError

from qloraga.config import DatasetFormat
from qloraga.errors import DataError

FORMATS = get_args(DatasetFormat)
CHAT_FORMATS = ("messages", "sharegpt")  # rendered by the chat template, which writes its own BOS and EOS
# ShareGPT's `from` -> the chat template's `role`.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
# For tokenizers that ship no chat template (base models): plain, role-tagged turns.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def is_local(source: str | os.PathLike) -> bool:
    """Whether `source` names a local data file (else a hub dataset NAME[:CONFIG])."""
    path = Path(source).expanduser()
    return path.suffix.lower() in {".jsonl", ".json", ".csv", ".parquet"} or path.exists()


def read_records(source: str | os.PathLike, split: str = "train") -> list[dict[str, Any]]:
    """Records from a JSON/JSONL/CSV/Parquet file, or split `split` of a hub dataset `NAME[:CONFIG]`."""
    path = Path(source).expanduser()
    if is_local(source):
        if not path.exists():
            raise DataError(f"Dataset file {str(source)!r} does not exist: give a JSON/JSONL/CSV/Parquet path "
                            "or a dataset name on the hub.")
        records = read_file(path)
    else:
        import datasets

        name, _, subset = str(source).partition(":")
        try:
            records = datasets.load_dataset(name, subset or None, split=split).to_list()
        except Exception as exc:  # datasets raises many types for a bad name, config or split, or no network
            raise DataError(f"Could not load split {split!r} of dataset {str(source)!r} from the hub ({exc}). "
                            "Check NAME[:CONFIG] and the split, or give a local JSON/JSONL/CSV/Parquet file.") from exc
    if not records:
        raise DataError(f"Dataset {str(source)!r} holds no records: it needs at least one example.")
    return records


def read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import datasets

        return datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
    if suffix == ".csv":  # cells stay text: a completion " 3" must not become the number 3
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(row) for row in csv.DictReader(f)]
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: a .json dataset must be a list of objects (or {{\"data\": [...]}}).")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg}). Each line of a JSONL file "
                            "must be one JSON object.") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}.")
        records.append(record)
    return records


def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise DataError(f"Cannot tell the dataset format from the keys {sorted(record)}: give --dataset-format "
                    f"(one of {', '.join(FORMATS[1:])}) and records with the fields it needs.")


def resolve_format(records: Sequence[dict[str, Any]], fmt: str) -> str:
    """The format of the whole dataset: as given, or detected from its first record."""
    if fmt not in FORMATS:
        raise DataError(f"Unknown dataset format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    return detect_format(records[0]) if fmt == "auto" and records else fmt


REQUIRED = {"alpaca": ("instruction", "output"), "prompt-completion": ("prompt", "completion"),
            "messages": ("messages",), "sharegpt": ("conversations",), "text": ("text",)}


def check_record(record: dict[str, Any], fmt: str, index: int) -> None:
    """Raise a DataError naming the record when it lacks what its format needs."""
    wanted = list if fmt in CHAT_FORMATS else str
    missing = [k for k in REQUIRED[fmt] if not isinstance(record.get(k), wanted)]
    if fmt == "alpaca" and not isinstance(record.get("input") or "", str):
        missing.append("input")
    if missing:
        raise DataError(f"Record {index + 1} lacks {missing} (as {'a list' if wanted is list else 'text'}), which "
                        f"the {fmt!r} format needs; it has {sorted(map(str, record))}.")
    if fmt == "messages":
        for turn in record["messages"]:
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                    and isinstance(turn.get("content"), str)):
                raise DataError(f"Record {index + 1}: every message needs a text 'role' and a text 'content'.")
    if fmt == "sharegpt":
        for turn in record["conversations"]:
            if not (isinstance(turn, dict) and turn.get("from") in SHAREGPT_ROLES
                    and isinstance(turn.get("value"), str)):
                raise DataError(f"Record {index + 1}: every turn of 'conversations' needs a 'from' (one of "
                                f"{', '.join(SHAREGPT_ROLES)}) and a text 'value'; got {turn!r}.")


# What each format trains on, as an error message names it.
RESPONSE_FIELDS = {"prompt-completion": "'completion'", "alpaca": "'output'", "text": "'text'",
                   "messages": "assistant messages' 'content'", "sharegpt": "gpt turns' 'value'"}


def empty_response(record: dict[str, Any], fmt: str) -> bool:
    """Whether a (checked) record's response is blank: it would teach the end-of-text token and nothing else."""
    if fmt in CHAT_FORMATS:
        return all(not m["content"].strip() for m in as_messages(record, fmt) if m["role"] == "assistant")
    return not record[REQUIRED[fmt][-1]].strip()


def count_empty_responses(records: Sequence[dict[str, Any]], fmt: str) -> int:
    """How many (checked) records have a blank response; a DataError, naming the field, when all have."""
    empty = sum(empty_response(r, fmt) for r in records)
    if records and empty == len(records):
        raise DataError(f"every one of the {len(records)} records has an empty {RESPONSE_FIELDS[fmt]}: there is "
                        "nothing to train on but the end-of-text token. Fill in the responses (or check the "
                        "format: --dataset-format).")
    return empty


def as_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """A chat record's turns as chat-template messages (`role`, `content`)."""
    if fmt == "sharegpt":
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    return record["messages"]


def render(record: dict[str, Any], fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """The record as text segments, each flagged True when the loss is taken on it."""
    if fmt == "prompt-completion":
        return [(record["prompt"], False), (record["completion"], True)]
    if fmt == "alpaca":
        extra = record.get("input") or ""
        input_block = f"### Input:\n{extra}\n\n" if extra else ""
        return [(ALPACA_PROMPT.format(instruction=record["instruction"], input_block=input_block), False),
                (record["output"], True)]
    if fmt == "text":
        return [(record["text"], True)]
    return render_messages(as_messages(record, fmt), tokenizer)


def render_messages(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """Chat turns through the chat template; each assistant turn is the difference between the rendering
    up to it (with the generation prompt) and the rendering including it."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("The 'messages' format needs a chat template and the tokenizer has none: set "
                        "chat_template in the config (or call qloraga.data.prepare_tokenizer).")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError("A conversation starts with an assistant message: put the user (or system) message it "
                            "answers before it.")
        try:
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        except TemplateError as exc:
            raise DataError(f"The chat template failed on a conversation: {exc}.") from exc
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError("The chat template does not render conversations incrementally; use a template "
                            "where each turn appends to the previous ones.")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    if not segments:
        raise DataError("A conversation has no assistant message: nothing to learn from it.")
    return segments


def prompt_and_answer(record: dict[str, Any], fmt: str, tokenizer) -> tuple[str, str] | None:
    """(prompt, expected answer) for exact-match evaluation, or None for raw text."""
    if fmt == "text":
        return None
    if fmt in CHAT_FORMATS:
        messages = as_messages(record, fmt)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return prompt, messages[last]["content"]
    segments = render(record, fmt, tokenizer)
    return segments[0][0], segments[1][0]


def uses_bos(tokenizer, fmt: str) -> bool:
    """Whether an example starts with BOS (chat templates write their own)."""
    return fmt not in CHAT_FORMATS and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", True)


def encode_prompt(tokenizer, prompt: str, fmt: str) -> list[int]:
    """Prompt ids exactly as `tokenize` lays them out before the response."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if uses_bos(tokenizer, fmt):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


# How `generation_prompt` renders a message for a model trained on each format, in words.
RENDERINGS = {
    "prompt-completion": "prompt-completion: the message is the prompt, as written, no chat template",
    "alpaca": "alpaca: the message is the instruction, in the '### Instruction: ... ### Response:' frame",
    "text": "text: the message is continued as raw text, no chat template",
    "messages": "the tokenizer's chat template, as for messages data",
    "sharegpt": "the tokenizer's chat template, as for sharegpt data",
}


def generation_prompt(messages: list[dict[str, str]], fmt: str, tokenizer) -> str:
    """The text a model trained on `fmt` data expects before its answer to `messages` (a conversation ending in
    a user message), rendered as training rendered its prompts: the conversation through the chat template for
    chat formats; for the others, which have no turns, the last message alone in that format's prompt."""
    text = messages[-1]["content"]
    if fmt in CHAT_FORMATS:
        record, fmt = {"messages": [*messages, {"role": "assistant", "content": ""}]}, "messages"
    elif fmt == "text":
        return text
    else:
        record = {"prompt-completion": {"prompt": text, "completion": ""},
                  "alpaca": {"instruction": text, "output": ""}}[fmt]
    return prompt_and_answer(record, fmt, tokenizer)[0]


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


def split(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split; at least one record on each side when there are two or more."""
    if not 0 < fraction < 1:
        raise DataError(f"--eval-split must be between 0 and 1, got {fraction}.")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(records) * fraction)), len(records) - 1) if len(records) > 1 else 0
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in order[:n_eval]]


def prepare_tokenizer(tokenizer, chat_template: str | None = None) -> list[str]:
    """Give the tokenizer a pad token and a chat template if it lacks them; return what was fixed."""
    fixes = []
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        fixes.append(f"the tokenizer had no pad token: using {tokenizer.pad_token!r}")
    if chat_template:
        tokenizer.chat_template = chat_template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        fixes.append("the tokenizer had no chat template: using a plain role-tagged one")
    return fixes

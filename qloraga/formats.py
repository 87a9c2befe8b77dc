"""The five dataset formats: detected, each record checked for the fields its format needs, rendered to text
segments flagged where the loss is taken, and the prompt a model trained on each format expects
(`generation_prompt`: chat, evaluate, the Modelfile); the tokenizer given a pad token and a chat template.

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

from collections.abc import Sequence
from typing import Any, get_args

from jinja2 import TemplateError

from qloraga.config import DatasetFormat
from qloraga.errors import DataError

FORMATS = get_args(DatasetFormat)
CHAT_FORMATS = ("messages", "sharegpt")  # rendered by the chat template, which writes its own BOS and EOS
# ShareGPT's `from` -> the chat template's `role`.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
# For tokenizers that ship no chat template (base models): plain, role-tagged turns.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


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
                        "chat_template in the config (or call qloraga.formats.prepare_tokenizer).")
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

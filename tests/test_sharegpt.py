"""ShareGPT records (`conversations` of `from`/`value` turns) are detected and train exactly as `messages` do."""

from __future__ import annotations

import pytest
from conftest import tiny_tokenizer

from qloraga.batches import tokenize
from qloraga.errors import DataError
from qloraga.formats import detect_format, prepare_tokenizer, prompt_and_answer, resolve_format
from qloraga.preflight import check_records

SHAREGPT = {"conversations": [{"from": "system", "value": "You add numbers."},
                              {"from": "human", "value": "3 plus 4?"}, {"from": "gpt", "value": "7"},
                              {"from": "human", "value": "and 5 plus 1?"}, {"from": "gpt", "value": "6"}]}
MESSAGES = {"messages": [{"role": "system", "content": "You add numbers."},
                         {"role": "user", "content": "3 plus 4?"}, {"role": "assistant", "content": "7"},
                         {"role": "user", "content": "and 5 plus 1?"}, {"role": "assistant", "content": "6"}]}


def test_detected_and_tokenized_as_the_same_messages():
    assert detect_format(SHAREGPT) == "sharegpt" and resolve_format([SHAREGPT], "auto") == "sharegpt"
    tokenizer = tiny_tokenizer()
    prepare_tokenizer(tokenizer)
    (shared,), _ = tokenize([SHAREGPT], "auto", tokenizer, 256)
    (plain,), _ = tokenize([MESSAGES], "auto", tokenizer, 256)
    assert shared.input_ids == plain.input_ids and shared.labels == plain.labels
    assert sum(label != -100 for label in shared.labels) > 0  # the gpt turns are trained
    assert prompt_and_answer(SHAREGPT, "sharegpt", tokenizer) == prompt_and_answer(MESSAGES, "messages", tokenizer)


def test_unknown_speaker_names_the_record():
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    with pytest.raises(DataError, match=r"--dataset d\.jsonl: Record 2: .*'from' \(one of system, human"):
        check_records([SHAREGPT, bad], "auto", "d.jsonl", "--dataset")

"""Property-based: any settings or records either work or raise our own error type, never anything else."""

from __future__ import annotations

from dataclasses import fields
from typing import get_args

from conftest import tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qloraga.batches import IGNORE, pack, tokenize
from qloraga.config import DIRECTIONS, SCALES, ConfigError, Init, QLoraGAConfig, RunConfig, merge_settings
from qloraga.errors import DataError
from qloraga.formats import FORMATS, prepare_tokenizer

RUN_KEYS = [f.name for f in fields(RunConfig)] + ["not_a_setting"]
LORA_KEYS = [f.name for f in fields(QLoraGAConfig)] + ["rank"]
plausible = st.sampled_from([1, 2, 8, 64, 0.5, 1e-3, 2.0, True, False, None, "auto", "ArB2r", "random", "stable",
                             "gd", "float32", "lora", "lora-ga", "cosine", "adamw_torch"])
scalars = st.one_of(plausible, plausible, st.none(), st.booleans(), st.integers(-3, 2**40),
                    st.floats(allow_nan=True), st.text(max_size=8))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))
lora_sections = st.one_of(values, st.dictionaries(st.sampled_from(LORA_KEYS), values, max_size=4))
run_settings = st.dictionaries(st.sampled_from(RUN_KEYS), values, max_size=5).flatmap(
    lambda d: st.builds(lambda section: {**d, "lora_ga": section}, lora_sections))


@settings(max_examples=300, deadline=None)
@given(preset=run_settings, file=run_settings, flags=run_settings)
def test_config_merging_works_or_raises_config_error(preset, file, flags):
    try:
        merged = merge_settings(merge_settings(merge_settings(RunConfig().to_dict(), preset), file), flags)
        cfg = RunConfig.from_dict(merged)
    except ConfigError:
        return
    assert cfg.lr > 0 and cfg.lora_ga.r >= 1  # what passed is usable


# Settings a user may well write, each within its documented range: these must always be accepted as given.
valid_lora = st.fixed_dictionaries({}, optional={
    "r": st.integers(1, 256), "lora_alpha": st.floats(1e-3, 1024), "lora_dropout": st.floats(0, 0.9),
    "direction": st.sampled_from(DIRECTIONS), "scale": st.sampled_from(SCALES), "stable_gamma": st.floats(1e-3, 1e3),
    "seed": st.integers(0, 2**31), "chunk_blocks": st.one_of(st.none(), st.integers(1, 64)),
    "init_memory_gb": st.one_of(st.just("auto"), st.floats(1e-3, 1e3))})
valid_run = st.fixed_dictionaries({}, optional={
    "init": st.sampled_from(get_args(Init)), "lr": st.floats(1e-7, 1.0), "max_steps": st.integers(1, 10**6),
    "batch_size": st.integers(1, 512), "grad_accum": st.integers(1, 512), "seq_len": st.integers(1, 2**17),
    "eval_split": st.floats(0.001, 0.9), "warmup_ratio": st.floats(0, 0.5), "weight_decay": st.floats(0, 1),
    "save_steps": st.integers(1, 10**4), "logging_steps": st.integers(1, 10**4), "seed": st.integers(0, 2**31),
    "packing": st.booleans(), "load_in_4bit": st.booleans(), "dtype": st.sampled_from(["bfloat16", "float32"]),
    "lora_ga": valid_lora})


@settings(max_examples=300, deadline=None)
@given(preset=valid_run, flags=valid_run)
def test_well_formed_settings_are_accepted_as_given(preset, flags):
    """The other half of the property above: code that raised on everything would pass it, not this."""
    cfg = RunConfig.from_dict(merge_settings(merge_settings(RunConfig().to_dict(), preset), flags))
    given_values = merge_settings(preset, flags)
    for key, value in given_values.items():
        if key != "lora_ga":
            assert getattr(cfg, key) == value, key
    for key, value in given_values.get("lora_ga", {}).items():
        assert getattr(cfg.lora_ga, key) == value, key


TOKENIZER = tiny_tokenizer()
prepare_tokenizer(TOKENIZER)  # as the recipe does: pad token and a chat template
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
field_values = st.one_of(text, st.none(), st.integers(), st.lists(text, max_size=2))
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": text}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), field_values, max_size=3)), max_size=4)
good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                "content": text}), min_size=1, max_size=4)
well_formed = st.one_of(
    st.fixed_dictionaries({"prompt": text, "completion": text}),
    st.fixed_dictionaries({"instruction": text, "output": text}, optional={"input": text}),
    st.fixed_dictionaries({"messages": good_messages}),
    st.fixed_dictionaries({"text": text}),
)
any_record = st.dictionaries(
    st.sampled_from(["prompt", "completion", "instruction", "input", "output", "text", "messages", "extra"]),
    st.one_of(field_values, messages), max_size=4)
record = st.one_of(well_formed, well_formed, any_record)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(record, min_size=1, max_size=4), fmt=st.sampled_from(FORMATS),
       seq_len=st.integers(1, 64), packing=st.booleans())
def test_dataset_formatting_works_or_raises_data_error(records, fmt, seq_len, packing):
    try:
        examples, report = tokenize(records, fmt, TOKENIZER, seq_len)
    except DataError:
        return
    assert report.examples == len(examples) >= 1
    for ex in examples:
        assert len(ex.input_ids) == len(ex.labels) <= seq_len
    if packing:
        assert sum(len(e.input_ids) for e in pack(examples, seq_len)) == sum(len(e.input_ids) for e in examples)


# Records that are well-formed for their format: every field there, a response with a word in it, a
# conversation that alternates user and assistant turns; with room for them (short texts, seq_len 256).
words = st.text(alphabet="abcdefghij 0123456789", max_size=30)
answer = words.filter(lambda s: s.strip())
turns = st.lists(st.tuples(words, answer), min_size=1, max_size=2)
conversation = st.builds(lambda system, pairs: ([{"role": "system", "content": system}] if system else [])
                         + [m for q, a in pairs for m in ({"role": "user", "content": q},
                                                          {"role": "assistant", "content": a})],
                         st.one_of(st.none(), words), turns)
correct = {
    "prompt-completion": st.fixed_dictionaries({"prompt": words, "completion": answer}),
    "alpaca": st.fixed_dictionaries({"instruction": words, "output": answer}, optional={"input": words}),
    "messages": st.fixed_dictionaries({"messages": conversation}),
    "text": st.fixed_dictionaries({"text": answer}),
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fmt=st.sampled_from(sorted(correct)), auto=st.booleans(), packing=st.booleans())
def test_well_formed_records_always_tokenize(data, fmt, auto, packing):
    """The other half of the property above: each well-formed record becomes one example with a trained span,
    whether the format is given or detected."""
    records = data.draw(st.lists(correct[fmt], min_size=1, max_size=4))
    examples, report = tokenize(records, "auto" if auto else fmt, TOKENIZER, 256)
    assert report.examples == len(examples) == len(records)
    for ex in examples:
        assert len(ex.input_ids) == len(ex.labels) <= 256
        assert any(label != IGNORE for label in ex.labels)
    if packing:
        rows = pack(examples, 256)
        assert [t for r in rows for t in r.input_ids] == [t for e in examples for t in e.input_ids]


def test_messages_without_a_chat_template_is_a_data_error():
    import pytest

    with pytest.raises(DataError, match="chat template"):
        tokenize([{"messages": [{"role": "assistant", "content": "4"}]}], "messages", tiny_tokenizer(), 32)

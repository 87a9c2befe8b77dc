"""Property-based: any settings or records either work or raise our own error type, never anything else."""

from __future__ import annotations

from dataclasses import fields

from conftest import tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qloraga.config import ConfigError, QLoraGAConfig, RunConfig, merge_settings
from qloraga.data import FORMATS, DataError, pack, prepare_tokenizer, tokenize

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


def test_messages_without_a_chat_template_is_a_data_error():
    import pytest

    with pytest.raises(DataError, match="chat template"):
        tokenize([{"messages": [{"role": "assistant", "content": "4"}]}], "messages", tiny_tokenizer(), 32)

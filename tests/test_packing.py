"""--packing: samples joined into one row see only themselves, so each keeps the loss it has unpacked."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import FAMILIES, VOCAB
from torch import nn
from transformers import AutoModelForCausalLM

from qloraga import QLoraGAConfig
from qloraga.adapters import get_lora_model
from qloraga.batches import IGNORE, Collator, Example, pack
from qloraga.config import RunConfig
from qloraga.evaluation import held_out_loss
from qloraga.training import build_trainer, parse_line

SEQ_LEN = 48


def samples(n: int = 9, seed: int = 0) -> list[Example]:
    """Token rows of 4-20 tokens; the first few labels of each masked, like a prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, VOCAB) for _ in range(rng.randint(4, 20))]
        prompt = rng.randint(1, len(ids) - 2)
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each token's cross-entropy against the next label (0 where masked), shape (batch, width - 1)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()  # as in training: no cache (training_arguments)
    labels = batch["labels"][:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    return loss * (labels != IGNORE)


def packed_sample_losses(model: nn.Module, rows: list[Example], batch: dict[str, torch.Tensor]) -> list[float]:
    """Summed loss of every sample of a packed batch, cut at the positions where position ids restart."""
    losses = token_losses(model, batch)
    out = []
    for i, row in enumerate(rows):
        starts = [j for j, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        out += [losses[i, a:b - 1].sum().item() for a, b in itertools.pairwise(starts)]
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_per_sample_losses_equal_unpacked(tiny_model_dir, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32).eval()
    examples, collate = samples(), Collator(pad_token_id=0)
    rows = pack(examples, SEQ_LEN)
    assert 1 < len(rows) < len(examples)  # several samples per row, several rows (so some are padded)
    assert [t for r in rows for t in r.input_ids] == [t for e in examples for t in e.input_ids]  # order kept
    with torch.no_grad():
        unpacked = [token_losses(model, collate([e])).sum().item() for e in examples]
        packed = packed_sample_losses(model, rows, collate(rows))
        # The same rows with one plain attention mask (packing as it was): samples see their neighbours.
        leaky = collate([Example(r.input_ids, r.labels) for r in rows])
        leaked = packed_sample_losses(model, rows, leaky)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(unpacked), rtol=1e-5, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(leaked, unpacked, strict=True)) > 1e-3  # the test can tell


def reference_pack(examples: list[Example], seq_len: int) -> list[Example]:
    """First fit in order, stated plainly: group the samples, then join each group."""
    groups: list[list[Example]] = []
    for ex in examples:
        if groups and sum(len(e.input_ids) for e in groups[-1]) + len(ex.input_ids) <= seq_len:
            groups[-1].append(ex)
        else:
            groups.append([ex])
    return [Example([t for e in g for t in e.input_ids],
                    [label for e in g for label in [IGNORE, *e.labels[1:]]],
                    [p for e in g for p in range(len(e.input_ids))]) for g in groups]


@pytest.mark.parametrize(("n", "seq_len"), [(9, SEQ_LEN), (1, SEQ_LEN), (40, 12), (300, 4096)])
def test_pack_equals_a_plain_first_fit(n, seq_len):
    """Against a straightforward reference, also with hundreds of samples in one row (the long rows pack
    builds in one pass) and with samples longer than the row (each alone in a row)."""
    examples = samples(n, seed=n)
    assert pack(examples, seq_len) == reference_pack(examples, seq_len)
    assert pack([], seq_len) == []


def test_collated_packed_rows_restart_positions_and_pad_as_their_own_sample():
    rows = pack(samples(), SEQ_LEN)
    batch = Collator(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention mask: it would join the samples
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        assert batch["position_ids"][i, :n].tolist() == row.position_ids
        assert batch["position_ids"][i, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
        assert (batch["labels"][i, n:] == IGNORE).all()
    starts = sum(1 for r in rows for p in r.position_ids if p == 0)
    assert starts == len(samples())


def first_logged_loss(model: nn.Module, rows: list[Example], out) -> float:
    """The loss the recipe's Trainer logs at step 1, with every row in one batch."""
    cfg = RunConfig(batch_size=len(rows), grad_accum=1, max_steps=1, logging_steps=1, lr=1e-3, packing=True,
                    gradient_checkpointing=False, report_to="none", dtype="float32")
    build_trainer(model, rows, Collator(pad_token_id=0), cfg, out).train()
    records = [parse_line(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r and "loss" in r)


def test_trainer_step_on_packed_rows_has_the_unpacked_loss(tiny_model_dir, tmp_path):
    """Through the recipe's Trainer (build_trainer): the first logged loss of one batch holding every packed row
    is the token mean of the samples' unpacked losses (plain LoRA starts at B = 0, so the model is the base);
    the same rows with one plain attention mask (packing as it was) log another loss."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    examples, collate = samples(), Collator(pad_token_id=0)
    rows = pack(examples, SEQ_LEN)
    with torch.no_grad():
        unpacked = sum(token_losses(base, collate([e])).sum().item() for e in examples)
    tokens = sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    model = get_lora_model(base, QLoraGAConfig(r=2, adapter_dtype="float32"))
    packed = first_logged_loss(model, rows, tmp_path / "packed")
    leaky = first_logged_loss(model, [Example(r.input_ids, r.labels) for r in rows], tmp_path / "leaky")
    assert packed == pytest.approx(unpacked / tokens, rel=1e-5)
    # A random tiny model attends almost uniformly, so the leak moves the mean loss by only ~4e-4 of it: still
    # ten times the tolerance above (the per-sample test shows it far larger on single samples).
    assert abs(leaky - unpacked / tokens) > 1e-4 * unpacked / tokens


def test_held_out_loss_of_packed_rows_is_the_unpacked_token_mean(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    examples, collate = samples(), Collator(pad_token_id=0)
    with torch.no_grad():
        unpacked = sum(token_losses(model, collate([e])).sum().item() for e in examples)
    tokens = sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    assert held_out_loss(model, pack(examples, SEQ_LEN), collate) == pytest.approx(unpacked / tokens, rel=1e-5)


def test_a_batch_mixing_packed_and_plain_rows_is_refused():
    rows = pack(samples(), SEQ_LEN)
    with pytest.raises(ValueError, match="pack all or none"):
        Collator(pad_token_id=0)([rows[0], Example(rows[1].input_ids, rows[1].labels)])


def test_packing_is_refused_for_a_family_whose_mask_ignores_position_ids(tmp_path, capsys):
    """Falcon builds its causal mask without the position ids: packed samples would see each other."""
    from transformers import FalconConfig

    from qloraga.cli.finetune import main

    FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1 plus 2 is", "completion": " 3"}\n' * 4)
    assert main(["--model", str(tmp_path), "--dataset", str(data), "--packing", "--output-dir",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--packing" in err and "'falcon'" in err and "Drop --packing" in err
    assert not (tmp_path / "out").exists()

"""The estimated gradient against autograd on the dequantized weights; chunking changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import estimated, make_batches, rel
from reference import autograd_grads, dequantized_fp32_copy

from qloraga import QLoraGAConfig, load_model
from qloraga.init.chunks import plan_chunks
from qloraga.init.gradient import Pairs
from qloraga.init.pipeline import initial_factors
from qloraga.targets import block_index, decoder_blocks, find_target_layers


@pytest.mark.parametrize(("family", "checkpointing"), [("llama", False), ("qwen2", False), ("llama", True),
                                                       ("gemma", True)])
def test_gradient_equals_autograd_on_dequantized_weights_fp32(tiny_model_dir, family, checkpointing):
    """fp32 compute: the only differences are summation orders, so 1e-4 relative is plenty. With
    checkpointing the blocks recompute their activations in the backward pass: the same gradient."""
    model = load_model(tiny_model_dir(family), dtype=torch.float32)
    batches = make_batches()
    grads, _ = estimated(model, batches, chunk_blocks=1, checkpointing=checkpointing)
    ref = autograd_grads(dequantized_fp32_copy(model), list(grads), batches)
    for name, g in grads.items():
        assert g.dtype == torch.float32
        assert rel(g, ref[name]) < 1e-4, name


def test_gradient_with_bf16_compute_is_close_to_fp32_autograd(tiny_model_dir):
    """bf16 compute (the default) rounds every activation to 8 bits of mantissa (~4e-3 each); through
    two blocks and the loss this leaves ~1e-2 relative error in G, so the bound is 3e-2 (and a cosine
    above 0.999). The weights are the same dequantized NF4 weights in both computations."""
    model = load_model(tiny_model_dir("llama"))
    batches = make_batches()
    grads, _ = estimated(model, batches)
    ref = autograd_grads(dequantized_fp32_copy(model), list(grads), batches)
    for name, g in grads.items():
        assert rel(g, ref[name]) < 3e-2, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref[name].flatten(), dim=0)
        assert cos > 0.999, name


def test_chunked_equals_unchunked(tiny_model_dir):
    model = load_model(tiny_model_dir("llama"))
    batches = make_batches()
    one, chunks_one = estimated(model, batches)
    per_block, chunks_many = estimated(model, batches, chunk_blocks=1)
    assert len(chunks_one) == 1 and len(chunks_many) == 2
    for name in one:
        torch.testing.assert_close(per_block[name], one[name], rtol=1e-6, atol=1e-9)
    fa, _ = initial_factors(model, find_target_layers(model), batches, QLoraGAConfig(r=4, progress=False))
    fb, report = initial_factors(model, find_target_layers(model), batches,
                              QLoraGAConfig(r=4, chunk_blocks=1, progress=False))
    assert report.chunks == 2
    for name in fa:
        torch.testing.assert_close(fb[name][0], fa[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fb[name][1], fa[name][1], rtol=1e-5, atol=1e-6)


def test_memory_budget_sets_the_chunk_size(tiny_model_dir):
    model = load_model(tiny_model_dir("llama"))
    targets = find_target_layers(model)
    block_bytes = 4 * sum(m.out_features * m.in_features for n, m in targets.items() if ".layers.0." in n)
    assert len(plan_chunks(model, targets, init_memory_gb=2 * block_bytes / 2**30)) == 1
    assert len(plan_chunks(model, targets, init_memory_gb=1.5 * block_bytes / 2**30)) == 2
    # A budget below one block still makes progress, one block per chunk.
    assert len(plan_chunks(model, targets, init_memory_gb=1e-9)) == 2


def test_auto_budget_plans_the_fewest_passes_the_free_memory_allows(tiny_model_dir):
    """`init_memory_gb="auto"`: HEADROOM * free - activations - the init's fp32 factors and SVD workspace,
    computed here from the shapes by hand; one chunk when every accumulator fits, one block per chunk only
    when memory is that tight."""
    from qloraga.init import chunks

    model = load_model(tiny_model_dir("llama"))
    targets = find_target_layers(model)
    batches = make_batches()
    block = 4 * sum(m.out_features * m.in_features for n, m in targets.items() if ".layers.0." in n)
    every = 4 * sum(m.out_features * m.in_features for m in targets.values())
    assert every == 2 * block  # two identical blocks
    params = sum(4 * (m.in_features + m.out_features) for m in targets.values())
    worst = max(m.out_features * m.in_features + m.out_features * min(m.out_features, m.in_features)
                + min(m.out_features, m.in_features) * m.in_features + 4 * min(m.out_features, m.in_features) ** 2
                for m in targets.values())
    own = 4 * params + 4 * worst
    c = model.config
    tokens = 2 * 12
    width = 2  # load_model's bf16 compute
    acts = tokens * ((c.hidden_size * c.num_hidden_layers + 4 * c.hidden_size + 3 * c.intermediate_size) * width
                     + c.vocab_size * 8)

    def auto(free: float) -> chunks.Budget:
        return chunks.auto_budget(model, targets, batches, r=4, svd_niter=None, checkpointing=True,
                                  free_bytes=int(free))

    for blocks, expected in [(1e6, 1), (2.5, 1), (1.5, 2), (0.0, 2)]:
        budget = auto((blocks * block + own + acts) / chunks.HEADROOM)
        assert budget.source == "free memory"
        assert budget.gb * 2**30 == pytest.approx(blocks * block, abs=16, rel=1e-6)
        assert len(plan_chunks(model, targets, init_memory_gb=budget.gb)) == expected
    assert "budget auto" in auto(1e15).describe(1) and "one pass" in auto(1e15).describe(1)
    assert "memory is tight" in auto(0).describe(2)


def test_auto_budget_is_the_default_and_the_summary_says_it(tiny_model_dir, monkeypatch):
    from qloraga.init import chunks

    assert QLoraGAConfig().init_memory_gb == "auto"
    model = load_model(tiny_model_dir("llama"))
    monkeypatch.setattr(chunks, "free_memory_bytes", lambda device: 0)  # no room: one block per chunk
    _, report = initial_factors(model, find_target_layers(model), make_batches(), QLoraGAConfig(r=4, progress=False))
    assert report.chunks == 2
    assert "budget auto: 0.0 MiB (free memory" in report.summary() and "2 chunk(s): memory is tight" in report.summary()
    monkeypatch.setattr(chunks, "free_memory_bytes", lambda device: 2**40)  # plenty: one pass
    _, roomy = initial_factors(model, find_target_layers(model), make_batches(), QLoraGAConfig(r=4, progress=False))
    assert roomy.chunks == 1 and "1 chunk(s): one pass" in roomy.summary()
    _, fixed = initial_factors(model, find_target_layers(model), make_batches(),
                            QLoraGAConfig(r=4, init_memory_gb=4, progress=False))
    assert fixed.chunks == 1 and "budget 4.00 GiB (init_memory_gb), 1 chunk(s)" in fixed.summary()


def test_init_memory_gb_takes_a_number_or_auto():
    from qloraga.cli.finetune import parser
    from qloraga.config import ConfigError

    assert QLoraGAConfig.from_dict({"init_memory_gb": 4}).init_memory_gb == 4.0
    assert QLoraGAConfig.from_dict({"init_memory_gb": 0.5}).init_memory_gb == 0.5
    assert QLoraGAConfig.from_dict({"init_memory_gb": "auto"}).init_memory_gb == "auto"
    for bad in ["lots", True, 0, -1.0]:
        with pytest.raises(ConfigError, match="init_memory_gb"):
            QLoraGAConfig.from_dict({"init_memory_gb": bad})
    assert getattr(parser().parse_args(["--init-memory-gb", "auto"]), "lora_ga.init_memory_gb") == "auto"
    assert getattr(parser().parse_args(["--init-memory-gb", "1.5"]), "lora_ga.init_memory_gb") == 1.5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimation_leaves_the_model_as_it_was(tiny_model_dir, checkpointing):
    model = load_model(tiny_model_dir("llama"))
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    estimated(model, make_batches(), checkpointing=checkpointing)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the blocks' own forward again
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_padding_tokens_do_not_contribute(tiny_model_dir):
    """Changing a padded (masked) token changes nothing: G only sees the loss of real tokens."""
    model = load_model(tiny_model_dir("llama"), dtype=torch.float32)
    a = make_batches(n_batches=1)
    b = [{k: v.clone() for k, v in a[0].items()}]
    b[0]["input_ids"][-1, -1] = 7  # a padded position (attention_mask 0, label -100)
    ga, _ = estimated(model, a)
    gb, _ = estimated(model, b)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-7)


def test_checkpointed_pass_holds_one_blocks_inputs_at_a_time(tiny_model_dir, monkeypatch):
    """With checkpointing, a layer's input is taken when its block re-runs in the backward pass, so the
    inputs waiting for their gradient all belong to one block (without it, to every block of the chunk)."""
    model = load_model(tiny_model_dir("llama"), dtype=torch.float32)
    blocks_name, _ = decoder_blocks(model)
    waiting: list[set[int]] = []
    add_x = Pairs.add_x

    def spy(self, name, x):
        add_x(self, name, x)
        waiting.append({block_index(n, blocks_name) for n in self.x})

    monkeypatch.setattr(Pairs, "add_x", spy)
    for checkpointing, most in [(True, 1), (False, 2)]:
        waiting.clear()
        estimated(model, make_batches(n_batches=1), checkpointing=checkpointing)
        assert max(len(blocks) for blocks in waiting) == most


def test_pairs_match_input_and_gradient_in_either_order():
    seen = []
    pairs = Pairs(lambda name, x, delta: seen.append((name, x.shape, delta.shape)))
    pairs.add_x("a", torch.ones(2, 3, 4))
    pairs.add_delta("b", torch.ones(6, 5))
    pairs.add_delta("a", torch.ones(2, 3, 5))
    pairs.add_x("b", torch.ones(6, 4))
    assert seen == [("a", (6, 4), (6, 5)), ("b", (6, 4), (6, 5))]
    pairs.add_x("unused", torch.ones(1, 4))  # a layer the loss does not reach: dropped, no error
    pairs.check_complete()
    pairs.add_delta("c", torch.ones(1, 5))
    with pytest.raises(RuntimeError, match="gradient_checkpointing=False"):
        pairs.check_complete()

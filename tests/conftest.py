"""Tiny models of every supported family, built from transformers configs (no download), and batches."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    TrainerCallback,
)

torch.set_num_threads(2)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
FAMILIES = {  # key: the preset the family's model_type selects (Phi-4 is Phi3Config, SmolLM2 LlamaConfig)
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON),
}
# Newer families, where this transformers has them: (config class, its extra arguments).
NEWER = {
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8)),
    "smollm": ("SmolLM3Config", dict(bos_token_id=1, eos_token_id=2)),
}
for _family, (_name, _extra) in NEWER.items():
    _cls = getattr(transformers, _name, None)
    if _cls is not None:
        FAMILIES[_family] = lambda cls=_cls, extra=_extra: cls(**COMMON, **extra)
# The preset a family's model_type selects, where it is not the family's own name.
FAMILY_PRESETS = {"gemma2": "gemma"}
LLAMA_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# Every attention and MLP projection of each family, as the family's code names them.
FAMILY_TARGETS = {family: LLAMA_NAMES for family in FAMILIES} | {
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-pair tokenizer of VOCAB tokens trained on a few sentences (pad=0, bos, eos, unk)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [f"{a} plus {b} is {a + b}. The answer: {a * b}! <|user|> <|assistant|> ### Instruction: Input: "
              "Response: \n abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ,;?'\"()[]{}=+-*/#_<>|"
              for a in range(20) for b in range(20)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def byte_level_bpe(corpus: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A GPT-2 style byte-level BPE (what llama.cpp calls tokenizer model "gpt2") trained on `corpus`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def save_tiny(family: str, path, seed: int = 0, **overrides) -> str:
    """A tiny random model of `family` (bf16) and a tiny tokenizer, saved as a model folder."""
    config = FAMILIES[family]()
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------------------- test tiers
# Every test gets one tier marker here, so no test module needs editing. `make test` (CI) runs every tier,
# `make test-fast` the unit tier (`pytest -m unit`).
#   unit: functions and tiny models in this process; no training run, subprocess, real model or llama.cpp.
#   integration: the command line, the Trainer or llama.cpp end to end, real models, subprocesses.
#   slow: wheel builds, several processes (torchrun, mp.spawn), the bench smoke test, interruption and kill
#     tests, minutes on a real model, a real browser.
# A key is a module or `module::test` (a test's name without its parameters, or the start of it); the longest
# key that matches decides. A module no key names is integration, so a new module stays out of the fast tier
# until someone lists it here. A test that marks its own tier (`pytest.mark.slow`) keeps it.
TIERS = {
    "test_adapters": "unit",
    "test_adapters::test_import_needs_no_private_bitsandbytes_function": "integration",  # a subprocess
    "test_bench_smoke": "slow",
    "test_cache::test_interrupted_initialisation": "slow",
    "test_cli::test_resume_after_interruption": "slow",
    "test_distributed::test_cli_under_torchrun": "slow",
    "test_distributed::test_ddp_steps": "slow",
    "test_distributed::test_init_is_identical_on_every_rank": "slow",
    "test_dryrun": "unit",
    "test_error_fit": "unit",
    "test_error_fit::test_cli_run_says_what_the_fit_did": "integration",  # the command line
    "test_error_fit::test_cli_refuses_what_has_no_error_to_fit": "integration",
    "test_error_fit::test_checkpoint_adapter_keeps_the_fit": "integration",
    "test_errors": "unit",
    "test_estimate": "unit",
    "test_estimate::test_auto_budget_is_the_default": "integration",  # three whole initialisations
    "test_export": "unit",
    "test_factors": "unit",
    "test_gguf::test_real_gguf_smollm2": "slow",
    "test_gguf_smollm2": "slow",
    "test_gpu_path": "unit",
    "test_gpu_path::test_qloraga_export_gguf": "integration",  # the command line
    "test_lora_one": "unit",
    "test_lora_one::test_one_training_run": "integration",
    "test_packaging": "slow",
    "test_packing": "unit",
    "test_packing::test_trainer_step": "integration",
    "test_preflight": "unit",
    "test_preflight::test_third_party_noise": "integration",  # a subprocess
    "test_presets": "unit",
    "test_properties": "unit",
    "test_ranks": "unit",
    "test_robustness::test_ctrl_c": "slow",
    "test_robustness::test_sigkill": "slow",
    "test_robustness::test_the_nan_guard": "unit",
    "test_sharegpt": "unit",
    "test_sketch::test_regenerated_test_matrices": "unit",
    "test_sketch::test_sketch_of_an_explicit_low_rank_matrix": "unit",
}
TIER_NAMES = ("unit", "integration", "slow")


def tier(module: str, test: str) -> str:
    """The tier `TIERS` gives test `test` (its name without parameters) of module `module`."""
    name = f"{module}::{test}"
    keys = [k for k in TIERS if name.startswith(k if "::" in k else k + "::")]
    return TIERS[max(keys, key=len)] if keys else "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIER_NAMES):
            item.add_marker(getattr(pytest.mark, tier(item.path.stem, getattr(item, "originalname", item.name))))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder factory: `tiny_model_dir(family)` saves (once) a tiny random model of that family."""
    made: dict[str, str] = {}

    def make(family: str = "llama") -> str:
        if family not in made:
            made[family] = save_tiny(family, tmp_path_factory.mktemp(family))
        return made[family]

    return make


def save_prequantized(source: str, path, compute_dtype: torch.dtype = torch.bfloat16) -> str:
    """`source` quantized to 4-bit NF4 (double quantization, bf16 compute) by transformers and saved as it is,
    with its tokenizer: a checkpoint like the `*-bnb-4bit` repos, whose config.json holds the quantization_config."""
    from transformers import AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map="cpu")  # no forward: bitsandbytes repacks nothing
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def prequantized_model_dir(tiny_model_dir, tmp_path_factory):
    """Folder factory: `prequantized_model_dir(family)` saves (once) the tiny model of that family pre-quantized."""
    made: dict[str, str] = {}

    def make(family: str = "qwen2") -> str:
        if family not in made:
            made[family] = save_prequantized(tiny_model_dir(family), tmp_path_factory.mktemp(f"{family}-bnb-4bit"))
        return made[family]

    return make


def make_batches(n_batches: int = 2, batch_size: int = 2, seq_len: int = 12, seed: int = 0,
                 pad_last: int = 3) -> list[dict[str, torch.Tensor]]:
    """Random token batches with right padding (masked in labels) on the last sequence of each batch."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
        mask = torch.ones_like(ids)
        if pad_last:
            ids[-1, -pad_last:] = 0
            mask[-1, -pad_last:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@pytest.fixture
def batches():
    return make_batches()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius difference |a - b| / |b|."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------ helpers that several test modules call
def logits(model, batches) -> torch.Tensor:
    """The model's fp32 logits on every batch, in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                          for b in batches])


def sgd_step(model, batches, lr) -> None:
    """One plain SGD step on the trainable parameters, over the mean loss of `batches`."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for batch in batches:
        (model(**batch).loss / len(batches)).backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


def decaying_grad(seed: int = 0, m: int = 48, n: int = 64) -> torch.Tensor:
    """m x n gradient with singular values 2^(-i/2) (the example of docs/ALGORITHM.md section 1)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = 2.0 ** (-torch.arange(m, dtype=torch.float64) / 2)
    return (u * s) @ v[:, :m].T


RECORDS = {  # one record of each dataset format, from two small numbers
    "prompt-completion": lambda a, b: {"prompt": f"{a} plus {b} is", "completion": f" {a + b}"},
    "alpaca": lambda a, b: {"instruction": "Add the numbers.", "input": f"{a} and {b}", "output": f"{a + b}"},
    "messages": lambda a, b: {"messages": [{"role": "user", "content": f"{a} plus {b}?"},
                                           {"role": "assistant", "content": f"{a + b}"}]},
    "text": lambda a, b: {"text": f"{a} plus {b} is {a + b}."},
    "sharegpt": lambda a, b: {"conversations": [{"from": "system", "value": "Add."},
                                                {"from": "human", "value": f"{a} plus {b}?"},
                                                {"from": "gpt", "value": f"{a + b}"}]},
}


def write_dataset(path, fmt, n=24) -> str:
    """`n` addition records of format `fmt` as a .jsonl, .json, .csv or .parquet file (by `path`'s suffix)."""
    import pandas as pd

    rows = [RECORDS[fmt](i % 7, i % 5) for i in range(n)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return str(path)


def run_cli(model, dataset, out, *extra) -> int:
    """`qloraga finetune` in this process with a 4-step LoRA-GA run's settings (`extra` overrides them)."""
    from qloraga.cli.finetune import main

    argv = ["--model", model, "--dataset", dataset, "--output-dir", str(out), "--init", "lora-ga", "--rank", "4",
            "--max-steps", "4",
            "--batch-size", "4", "--grad-accum", "1", "--ga-batches", "2", "--seq-len", "128", "--lr", "1e-3",
            "--save-steps", "2", "--logging-steps", "1", "--eval-samples", "4", "--no-gradient-checkpointing",
            "--dtype", "float32", *extra]  # fp32 compute: bf16 matmuls are emulated (slow) on CPUs like CI's
    return main(argv)


class Interrupt(TrainerCallback):
    """Ctrl-C as if pressed during step 3 of a run."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:  # after the checkpoint of step 2, before the end
            raise KeyboardInterrupt


def fails_with(capsys, code: int, *needles: str) -> tuple[str, str]:
    """A command refused as a user's error: exit code 2, every needle in its stderr, no traceback. Returns what it
    printed, (stdout, stderr)."""
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in captured.err, captured.err
    return captured.out, captured.err


def run_cli_interrupted(monkeypatch, *args) -> int:
    """`run_cli(*args)` with Ctrl-C pressed during step 3 (`Interrupt`), the recipe's trainer restored after."""
    import qloraga.training as training

    real = training.build_trainer

    def interrupted(*a, **kw):
        trainer = real(*a, **kw)
        trainer.add_callback(Interrupt())
        return trainer

    monkeypatch.setattr("qloraga.recipe.build_trainer", interrupted)
    try:
        return run_cli(*args)
    finally:
        monkeypatch.setattr("qloraga.recipe.build_trainer", real)


def estimated(model, batches, chunk_blocks=None, init_memory_gb=4.0, checkpointing=False):
    """The estimator's gradient of every target layer, chunk by chunk as planned, and the chunks."""
    from qloraga.init.chunks import plan_chunks
    from qloraga.init.gradient import accumulate_chunk
    from qloraga.targets import find_target_layers

    targets = find_target_layers(model)
    chunks = plan_chunks(model, targets, init_memory_gb=init_memory_gb, chunk_blocks=chunk_blocks)
    grads = {}
    for names in chunks:
        grads.update(accumulate_chunk(model, {n: targets[n] for n in names}, batches, checkpointing=checkpointing))
    return grads, chunks


def training_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids training put before the completion of a prompt-completion record with this prompt."""
    from qloraga.batches import IGNORE, tokenize

    (example,), _ = tokenize([{"prompt": prompt, "completion": " 7"}], "prompt-completion", tokenizer, 512)
    return example.input_ids[:next(i for i, label in enumerate(example.labels) if label != IGNORE)]


# Tiny byte-level BPE models as llama.cpp reads them (GGUF export tests).
GGUF_VOCAB = 320
GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE (ByteLevel pre-tokenizer and decoder) trained on a small corpus."""
    corpus = [f"The answer: {a} plus {b} is {a + b}. Tom has {a} apples and buys {b} more! café ünïcode (x) = [y]"
              for a in range(30) for b in range(30)]
    tok = byte_level_bpe(corpus, GGUF_VOCAB - 8, GGUF_SPECIALS)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None)
    out.chat_template = CHATML
    return out


def save_family(family: str, path, tokenizer=byte_level_tokenizer) -> str:
    """A tiny random model of `family` with a GGUF-exportable tokenizer, saved as a model folder."""
    from transformers import AutoModelForCausalLM

    config = FAMILIES[family]()
    config.vocab_size = GGUF_VOCAB
    config.initializer_range = 0.15  # sharper logits than the default 0.02: greedy choices are not near ties
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)

"""Independent references: an fp32 model whose weights are the dequantized NF4 weights, and its autograd;
llama.cpp running a GGUF file against transformers; LoRA-One's step 0 written out from an fp64 SVD."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from qloraga.loading import dequantized_weight


def dequantized_fp32_copy(model: nn.Module) -> nn.Module:
    """A plain fp32 transformers model computing with the weights `model` really uses."""
    ref = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    source = dict(model.named_modules())
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name not in source:
                continue
            src = source[name]
            if isinstance(module, nn.Linear):
                module.weight.copy_(dequantized_weight(src).float())
                if module.bias is not None:
                    module.bias.copy_(src.bias.float())
            else:
                for pname, param in module.named_parameters(recurse=False):
                    param.copy_(getattr(src, pname).float())
    return ref.eval()


def autograd_grads(ref: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean over batches of dL/dW for the named linear layers, by plain autograd."""
    modules = dict(ref.named_modules())
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    for batch in batches:
        ref(**batch, use_cache=False).loss.backward()
    return {n: modules[n].weight.grad / len(batches) for n in names}


def expected_step0(grad: torch.Tensor, r: int, scale: str, gamma: float, scaling: float) -> torch.Tensor:
    """`s B A` of LoRA-One, written out from an fp64 SVD: `-(s c^2 / S_1) G_r`."""
    u, s, vt = torch.linalg.svd(grad.double(), full_matrices=False)
    grad_r = (u[:, :r] * s[:r]) @ vt[:r]
    c2 = {"stable": grad.shape[0] ** 0.5 / gamma, "gd": 1 / scaling**2, "unit": 1.0}[scale]
    return -(scaling * c2 / s[0]) * grad_r


PROMPTS = ["The answer: 12 plus 7 is", "Tom has 3 apples", "<|im_start|>user\nHi there!<|im_end|>\n",
           "café ünïcode (x) = [y] + {z};"]
# max |logit(llama.cpp) - logit(transformers, fp32)| over every position of PROMPTS, as a fraction of the
# logits' standard deviation (~1.2 here), with llama.cpp's KV cache in f32: f32 GGUFs (the exact tensors)
# agree to ~5e-6, f16 GGUFs to ~1e-2 (weights rounded to f16 once).
EXACT_TOL = 1e-4
LOGIT_TOL = 2e-2


def llama_cpp_model(path, lora=None):
    llama_cpp = pytest.importorskip("llama_cpp")
    kwargs = {"lora_path": str(lora)} if lora else {}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, n_batch=64, logits_all=True,
                               verbose=False, seed=0, type_k=0, type_v=0, **kwargs)  # f32 KV cache


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def prompt_ids(run: str) -> list[list[int]]:
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(run, "adapter"))
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def compare(llm, model, run) -> float:
    """Largest |llama.cpp - transformers| logit over all positions of all prompts, relative to the spread."""
    worst = 0.0
    for ids in prompt_ids(run):
        ref = hf_logits(model, ids)
        worst = max(worst, float(np.abs(cpp_logits(llm, ids) - ref).max() / ref.std()))
    return worst

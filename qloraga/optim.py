"""Riemannian-preconditioned optimizers for LoRA (Zhang and Pilanci, ICML 2024, arXiv 2402.02347;
docs/ALGORITHM.md section 4).

Each LoRA layer's gradients are preconditioned by an r x r matrix before the usual update:

    grad_A <- (B^T B + eps I)^-1 grad_A        grad_B <- grad_B (A A^T + eps I)^-1

with `A`, `B` the values before the step. Plain gradient descent on the factors moves `W = s B A` by
`-lr s^2 (B B^T G + G A^T A)`, which depends on how `B A` is split between the factors; the preconditioned
step moves it by `-lr s^2 (P_B G + G P_A)` (P the projections on the factors' column/row spaces, for
eps -> 0), whatever the split. `ScaledAdamW` feeds the preconditioned gradients to AdamW, as the paper's
"scaled AdamW" does; `ScaledSGD` to SGD.

qloraga's frozen correction `-s B0 A0` is a constant of the layer: it changes `W` but neither the gradients
of `A` and `B` nor the preconditioners, which see only the trainable factors. Any init works (B = 0 too:
then `grad_A = 0` and the first step moves `B` by `grad_B (A A^T + eps I)^-1`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from qloraga.config import SCALED_OPTIMIZERS, check_choice
from qloraga.errors import ConfigError

LoraPair = tuple[nn.Parameter, nn.Parameter]  # (A: r x in, B: out x r)


def lora_pairs(model: nn.Module) -> list[LoraPair]:
    """The trainable (A, B) weights of every LoRA layer of `model`, every adapter."""
    pairs = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                if a.requires_grad and b.requires_grad:
                    pairs.append((a, b))
    return pairs


@torch.no_grad()
def precondition_(pairs: Iterable[LoraPair], eps: float) -> None:
    """Replace each pair's gradients by their preconditioned versions, from the factors' current values."""
    for a, b in pairs:
        if a.grad is None or b.grad is None:
            continue
        af, bf = a.float(), b.float()
        eye = torch.eye(a.shape[0], device=a.device, dtype=torch.float32)
        grad_a = torch.linalg.solve(bf.T @ bf + eps * eye, a.grad.float())
        grad_b = torch.linalg.solve(af @ af.T + eps * eye, b.grad.float().T).T  # (A A^T + eps I) is symmetric
        a.grad.copy_(grad_a)
        b.grad.copy_(grad_b)


class Preconditioned:
    """Mixed in before a torch optimizer: precondition the LoRA pairs' gradients, then take its step."""

    def __init__(self, params, pairs: list[LoraPair], *, precond_eps: float = 1e-6, **kwargs):
        super().__init__(params, **kwargs)
        self.pairs, self.precond_eps = pairs, precond_eps

    def step(self, closure=None):
        precondition_(self.pairs, self.precond_eps)
        return super().step(closure)


class ScaledAdamW(Preconditioned, torch.optim.AdamW):
    """AdamW on preconditioned LoRA gradients; other trainable parameters get plain AdamW."""


class ScaledSGD(Preconditioned, torch.optim.SGD):
    """SGD on preconditioned LoRA gradients; other trainable parameters get plain SGD."""


def scaled_optimizer(model: nn.Module, name: str, lr: float, *, weight_decay: float = 0.0,
                     precond_eps: float = 1e-6) -> torch.optim.Optimizer:
    """`scaled_adamw` or `scaled_sgd` over every trainable parameter of `model`, LoRA pairs preconditioned."""
    check_choice("optimizer", name, SCALED_OPTIMIZERS)
    params = [p for p in model.parameters() if p.requires_grad]
    pairs = lora_pairs(model)
    if not pairs:
        raise ConfigError(f"--optim {name} preconditions LoRA adapters, and this model has no trainable LoRA "
                          "layer: use --optim adamw_torch for full fine-tuning.")
    cls = ScaledAdamW if name == "scaled_adamw" else ScaledSGD
    return cls(params, pairs, precond_eps=precond_eps, lr=lr, weight_decay=weight_decay)

"""Which layers get adapters: the decoder blocks of a model and the linear layers inside them."""

from __future__ import annotations

from torch import nn

from qloraga.errors import ConfigError, ModelSourceError


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the longest `ModuleList` whose items hold linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ModelSourceError(f"{type(model).__name__} has no stack of decoder blocks (an nn.ModuleList of "
                               "layers holding linear layers): qloraga works on decoder-only causal LMs.")
    return best


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_target_layers(model: nn.Module, target_modules: list[str] | None = None) -> dict[str, nn.Linear]:
    """Map full module name -> linear layer for every target.

    `None` means every linear layer inside the decoder blocks (all attention and MLP projections);
    otherwise a name matches a target when it equals it or ends with `"." + target`, as in PEFT.
    """
    blocks_name, _ = decoder_blocks(model)
    linears = linear_names(model)
    if target_modules is None:
        chosen = [n for n in linears if n.startswith(blocks_name + ".")]
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(f"No linear layer matches target_modules={target_modules!r}. This model's linear "
                          f"layers are named {leaves}: pass some of those (or None for all projections).")
    modules = dict(model.named_modules())
    return {name: modules[name] for name in chosen}


def block_index(name: str, blocks_name: str) -> int | None:
    """Index of the decoder block holding module `name`, or None if it lies outside the blocks."""
    prefix = blocks_name + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def short_target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Leaf names (e.g. `q_proj`) when they select exactly `targets` in `model`, else the full names.

    Portable adapters list leaf names: vLLM and PEFT match those on any checkpoint of the family.
    """
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    matched = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return leaves if matched == set(targets) else sorted(targets)

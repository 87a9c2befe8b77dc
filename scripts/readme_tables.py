"""Print docs/options.md's two generated tables from the code: every `finetune` option (from the settings'
declarations) and the presets (from qloraga/configs/). `tests/test_readme.py` checks docs/options.md holds them
verbatim; after changing a setting or a preset, run this and paste its output over the old tables."""

from __future__ import annotations

import argparse
from dataclasses import fields

from qloraga.cli.finetune import parser
from qloraga.config import DEFAULT_LR, INITS, SECTION, QLoraGAConfig, RunConfig, flag_of
from qloraga.presets import MODEL_TYPE_PRESETS, SMALL_MODEL, SMALL_MODEL_PRESETS, available_presets, load_preset


def option_table() -> str:
    """One row per flag: the flag (and its aliases), the YAML key it sets, its default, its help."""
    actions = {a.dest: a for a in parser()._actions}
    rows = ["| option | YAML key | default | what it sets |", "| --- | --- | --- | --- |",
            "| `--config FILE` | | | YAML settings over the preset; flags override them |"]
    for cls, prefix in ((RunConfig, ""), (QLoraGAConfig, SECTION + ".")):
        for f in fields(cls):
            if flag_of(cls, f.name) is None:
                continue
            action = actions[prefix + f.name]
            names = list(action.option_strings)
            if isinstance(action, argparse.BooleanOptionalAction):
                names = [n for n in names if not n.startswith("--no-")] + [n for n in names if n.startswith("--no-")]
            default = "per init" if f.name == "lr" else f.default
            rows.append(f"| {', '.join(f'`{n}`' for n in names)} | `{prefix}{f.name}` | `{default}` | "
                        f"{f.metadata['help']} |")
    rows.append(f"| `--dry-run` | | | {actions['dry_run'].help} |")
    return "\n".join(rows)


def preset_table() -> str:
    """One row per preset: the model types that select it, targets, rank, learning rate per init, sizes."""
    by_preset: dict[str, list[str]] = {}
    for model_type, preset in MODEL_TYPE_PRESETS.items():
        by_preset.setdefault(preset, []).append(f"`{model_type}`")
    for model_type, preset in SMALL_MODEL_PRESETS.items():
        by_preset.setdefault(preset, []).append(f"`{model_type}` below {SMALL_MODEL / 1e9:g}B parameters")
    by_preset["demo"] = ["the embedded demo model"]
    rows = [f"| preset | selected for (`model_type`) | target modules | r / alpha | lr ({' / '.join(INITS)}) | "
            "seq / batch x accum |", "| --- | --- | --- | --- | --- | --- |"]
    defaults = RunConfig(lr=1.0)
    for name in available_presets():
        cfg = load_preset(name)
        lora = {**QLoraGAConfig().to_dict(), **cfg.get(SECTION, {})}
        lr = cfg.get("lr", {})
        rates = " / ".join(f"{(lr if isinstance(lr, float) else lr.get(i, DEFAULT_LR[i])):g}"
                           for i in INITS)
        targets = ", ".join(t.removesuffix("_proj") for t in lora["target_modules"]) if lora["target_modules"] \
            else "every linear layer of the blocks"
        sizes = (f"{cfg.get('seq_len', defaults.seq_len)} / {cfg.get('batch_size', defaults.batch_size)} x "
                 f"{cfg.get('grad_accum', defaults.grad_accum)}")
        rows.append(f"| `{name}` | {', '.join(by_preset.get(name, ['only with --preset']))} | {targets} | "
                    f"{lora['r']} / {lora['lora_alpha']:g} | {rates} | {sizes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(option_table() + "\n\n" + preset_table())

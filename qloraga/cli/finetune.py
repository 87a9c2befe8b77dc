"""`qloraga finetune`: flags -> `RunConfig` (defaults < preset < --config file < flags) -> `recipe.finetune`.

The parser is generated from the settings' declarations (`config.setting`): each field's type, choices,
help and flag, so a new setting needs no line here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, dataclass, fields
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from qloraga.config import (
    DEFAULT_LR,
    METHODS,
    SECTION,
    QLoraGAConfig,
    RunConfig,
    canonical_sections,
    flag_of,
    merge_settings,
)
from qloraga.presets import SAFE_DEFAULTS, available_presets, choose_preset, load_preset, load_yaml


def gib_or_auto(text: str) -> float | str:
    """`--init-memory-gb`: a number of GiB, or "auto"."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB or 'auto', got {text!r}") from None


def argument(parser: argparse.ArgumentParser, cls: type, name: str, dest: str) -> None:
    """One flag from the declaration of setting `name` of `cls` (type, Literal choices, default, help)."""
    f = next(f for f in fields(cls) if f.name == name)
    flags = [flag_of(cls, name), *f.metadata.get("aliases", ())]
    hint = get_type_hints(cls)[name]
    union = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    options = [o for o in union if o is not type(None)]
    default = f.default if f.default is not MISSING else None
    help_line = f.metadata["help"]
    if default not in (None, False, True) and "default" not in help_line:
        help_line += f" (default: {default})"
    kwargs: dict[str, Any] = {"dest": dest, "help": help_line}
    if options == [bool]:
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
    elif get_origin(options[0]) is Literal:
        kwargs["choices"] = list(get_args(options[0]))
    else:
        kwargs["metavar"] = flags[0].removeprefix("--").replace("-", "_").upper()
    if options == [float, str]:
        kwargs["type"] = gib_or_auto
    elif options[0] in (int, float):
        kwargs["type"] = options[0]
    parser.add_argument(*flags, **kwargs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a causal LM with gradient-aligned LoRA adapters on a 4-bit (--4bit) or bf16 base. "
                    "With no argument: the embedded demo (tiny model, arithmetic word problems), on any machine.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file of settings, applied over the preset (flags override it)")
    for cls, prefix in ((RunConfig, ""), (QLoraGAConfig, SECTION + ".")):
        for f in fields(cls):
            if flag_of(cls, f.name) is not None:
                argument(p, cls, f.name, prefix + f.name)
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration, data statistics, two "
                   "rendered examples and a memory estimate, then exit without loading weights")
    p.epilog = f"Presets: {', '.join(available_presets())}."
    return p


def flag_settings(args: dict[str, Any]) -> dict[str, Any]:
    """Parsed flags as a settings mapping: `lora_ga.r` (or the flag's own name, `rank`) -> `{"lora_ga": {"r": ...}}`."""
    by_flag = {flag[2:].replace("-", "_"): f.name for f in fields(QLoraGAConfig)
               if (flag := flag_of(QLoraGAConfig, f.name))}
    settings: dict[str, Any] = {SECTION: {}}
    for dest, value in args.items():
        if dest.startswith(SECTION + ".") or dest in by_flag:
            settings[SECTION][by_flag.get(dest) or dest.removeprefix(SECTION + ".")] = value
        elif dest != "config":
            settings[dest] = value
    return settings


@dataclass
class Resolved:
    """The run's settings and where the ones a user asks about came from, for the run's first lines."""

    config: RunConfig
    preset: str | None
    preset_reason: str
    lr_source: str

    def lines(self) -> list[str]:
        preset = f"preset {self.preset}" if self.preset else "no preset"
        return [f"{preset}: {self.preset_reason}",
                f"lr {self.config.lr:g} for init {self.config.init}: {self.lr_source}"]


def resolve_settings(args: dict[str, Any]) -> Resolved:
    """Merge defaults, preset, --config file and flags into one validated `RunConfig`, and say where the
    preset and the learning rate came from."""
    flags = flag_settings(args)
    file_settings = canonical_sections(load_yaml(args["config"])) if "config" in args else {}
    model = flags.get("model", file_settings.get("model", RunConfig.model))
    preset = flags.get("preset", file_settings.get("preset"))
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset is None:
        preset, reason = choose_preset(model)
        if preset is None:
            layers.append(("the defaults for a family without a preset", SAFE_DEFAULTS))
    else:
        reason = "asked for with --preset" if "preset" in flags else f"named in {args['config']}"
    if preset:
        layers.append((f"preset {preset}", load_preset(preset)))
    if file_settings:
        layers.append((f"--config {args['config']}", file_settings))
    layers.append(("--lr", flags))
    settings: dict[str, Any] = {}
    for _, layer in layers:
        settings = merge_settings(settings, layer)
    settings = init_from_method(settings, [layer for _, layer in layers])
    settings["preset"] = preset
    config = RunConfig.from_dict(settings)
    given = [(where, layer["lr"]) for where, layer in layers if layer.get("lr") is not None]
    if given:  # the last layer that set lr decided it
        where, lr = given[-1]
        lr_source = where + (f", its rate for {config.init}" if isinstance(lr, dict) else "")
    else:
        lr_source = (f"the built-in default for {config.init} "
                     f"({', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})")
    return Resolved(config, preset, reason, lr_source)


def init_from_method(settings: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    """`init` is the one field that picks the method. A layer that sets `lora_ga.method` (the library's name)
    without `init` sets `init`; one that sets both differently is refused."""
    for layer in layers:
        method = (layer.get(SECTION) or {}).get("method")
        if method is None:
            continue
        if layer.get("init", method) in METHODS and layer.get("init", method) != method:
            from qloraga.errors import ConfigError

            raise ConfigError(f"init {layer['init']!r} and lora_ga.method {method!r} disagree: give --init / init "
                              "alone (it sets the method).")
        if "init" not in layer:
            settings = {**settings, "init": method}
    # (A plain-LoRA run, init "lora", computes no gradient init: its lora_ga.method is not used.)
    return settings


def resolve(args: dict[str, Any]) -> RunConfig:
    return resolve_settings(args).config


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = parser()
    if prog:  # `qloraga finetune` rather than the script's name
        p.prog = prog
    args = vars(p.parse_args(argv))
    dry = args.pop("dry_run", False)
    from qloraga.cli import run_command

    def job() -> None:
        resolved = resolve_settings(args)
        if dry:
            from qloraga.cli.dryrun import dry_run

            dry_run(resolved.config, resolved.lines())
        else:
            from qloraga.recipe import finetune  # heavy imports after --help

            finetune(resolved.config, notes=resolved.lines())

    return run_command(job)


if __name__ == "__main__":
    sys.exit(main())

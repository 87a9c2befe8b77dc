"""The page's settings form, derived from `RunConfig` and `QLoraGAConfig`: one field per setting, labelled as
the CLI names it (`--rank / lora_ga.r`), so that an error naming a setting points at its field.

`resolve_form` fills the form as `qloraga finetune` would resolve the model, preset and flags; `to_config`
turns the edited form back into a validated `RunConfig`, with the CLI's errors.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from qloraga.config import QLoraGAConfig, RunConfig, option

# Set elsewhere on the page (model, dataset, preset and run name at the top, trust_remote_code with its warning)
# or by the page itself (resume, overwrite), or by the recipe from another setting (method from init, progress).
NOT_FIELDS = {"model", "dataset", "preset", "output_dir", "resume", "overwrite", "trust_remote_code",
              "lora_ga.method", "lora_ga.progress"}
# Shown first; the rest under "All settings".
MAIN = ("init", "lora_ga.r", "lr", "max_steps", "epochs", "seq_len", "batch_size", "grad_accum", "load_in_4bit",
        "lora_ga.estimator")


@dataclass(frozen=True)
class Field:
    """One setting of the form: its key (`lr`, `lora_ga.r`), type and label."""

    key: str
    hint: Any
    default: Any
    help: str = ""

    @property
    def label(self) -> str:
        return option(self.key)

    @property
    def choices(self) -> tuple[str, ...]:
        return get_args(self.hint) if get_origin(self.hint) is Literal else ()

    @property
    def kind(self) -> str:
        """checkbox, dropdown (a Literal), int, float or text (optional and mixed types)."""
        if self.choices:
            return "dropdown"
        return {bool: "checkbox", int: "int", float: "float"}.get(self.hint, "text")

    def to_value(self, setting: Any) -> Any:
        """A setting as its field shows it."""
        if self.kind != "text":
            return setting
        if setting is None:
            return ""
        return ", ".join(setting) if isinstance(setting, list) else str(setting)

    def to_setting(self, value: Any) -> Any:
        """A field's value as the setting (wrong types are left for `RunConfig.from_dict` to name)."""
        if self.kind in ("int", "float") and isinstance(value, float) and value.is_integer() and self.hint is int:
            return int(value)
        if self.kind != "text":
            return value
        text = str(value).strip()
        options = get_args(self.hint) if get_origin(self.hint) in (Union, types.UnionType) else (self.hint,)
        if text == "" and type(None) in options:
            return None
        if any(get_origin(o) is list for o in options):
            return [part.strip() for part in text.split(",") if part.strip()]
        if str in options:
            return text if not (float in options or int in options) else parsed_number(text)
        return parsed_number(text)


def parsed_number(text: str) -> Any:
    """`4` -> 4, `3e-3` -> 0.003, anything else as YAML reads it (`auto` -> "auto"), as a --config file would."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def form_fields() -> list[Field]:
    """Every setting of a run that the form edits, main ones first."""
    out = []
    for cls, prefix in ((RunConfig, ""), (QLoraGAConfig, "lora_ga.")):
        hints = get_type_hints(cls)
        defaults = cls().to_dict()
        out += [Field(prefix + f.name, hints[f.name], defaults[f.name], f.metadata.get("help", ""))
                for f in fields(cls)
                if f.name != "lora_ga" and prefix + f.name not in NOT_FIELDS]
    return sorted(out, key=lambda f: MAIN.index(f.key) if f.key in MAIN else len(MAIN))


FIELDS = form_fields()


def get(settings: dict[str, Any], key: str) -> Any:
    section, _, name = key.rpartition(".")
    return (settings.get(section) or {}).get(name) if section else settings.get(key)


def resolve_form(model: str, dataset: str, preset: str | None) -> tuple[RunConfig, str]:
    """The settings `qloraga finetune --model M --dataset D [--preset P] --4bit` resolves to, and the CLI's
    lines on where the preset and the learning rate came from (Markdown)."""
    from qloraga.cli.finetune import resolve_settings

    args: dict[str, Any] = {"model": model or "demo", "dataset": dataset or "demo", "load_in_4bit": True}
    if preset:
        args["preset"] = preset
    resolved = resolve_settings(args)
    return resolved.config, summary(resolved.config, resolved.lines())


def summary(cfg: RunConfig, lines: list[str]) -> str:
    """The resolved settings a user asks about first, and where they came from (Markdown)."""
    steps = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.epochs:g} epochs"
    return (f"**Preset** {cfg.preset or 'none'} · **init** {cfg.init} · **rank** {cfg.lora_ga.r} · "
            f"**learning rate** {cfg.lr:g} · **{steps}** · **sequence length** {cfg.seq_len} · **batch** "
            f"{cfg.batch_size} × {cfg.grad_accum} accumulated\n\n" + "\n".join(f"- {line}" for line in lines))


def to_config(model: str, dataset: str, preset: str | None, trust_remote_code: bool,
              values: dict[str, Any]) -> RunConfig:
    """The edited form as a validated `RunConfig` (a ConfigError names the setting, as the CLI's does)."""
    settings: dict[str, Any] = {"model": model or "demo", "dataset": dataset or "demo", "preset": preset or None,
                                "trust_remote_code": bool(trust_remote_code), "lora_ga": {}}
    for f in FIELDS:
        setting = f.to_setting(values[f.key])
        section, _, name = f.key.rpartition(".")
        (settings[section] if section else settings)[name] = setting
    return RunConfig.from_dict(settings)


def field_of(message: str) -> str | None:
    """The field an error message names first: a form key (`--rank / lora_ga.r ...` -> `lora_ga.r`), or one of
    TOP_FIELDS (model, dataset, name, trust_remote_code); None when it names none."""
    names = [(f.label, f.key) for f in FIELDS] + [(f.label.split(" / ")[0], f.key) for f in FIELDS
                                                  if f.label.startswith("--")]
    names += [(marker, top) for top, markers in TOP_FIELDS.items() for marker in markers]
    found = [(m.start(), -len(label), key) for label, key in names
             if (m := re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", message))]
    return min(found)[2] if found else None


# The fields above the form, and how the CLI's messages name them.
TOP_FIELDS = {"model": ("--model",), "dataset": ("--dataset", "--eval-dataset", "Dataset file"),
              "name": ("--output-dir / output_dir",), "trust_remote_code": ("--trust-remote-code", "trust_remote_code")}

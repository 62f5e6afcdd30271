"""The train form, generated from the config's fields: one input per setting, its description as help text.

A setting added to `sdlora.config` appears here with no UI code. `MAIN` only chooses which settings sit in front;
the rest are folded away by section. The form's values plus the chosen preset give the exact config.toml that
`sdlora train` runs.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from sdlora.config import Config, load, read_toml, to_toml
from sdlora.errors import UsageError

# The sections `sdlora train` reads (prep's trigger comes from the dataset; generate/eval settings shape the
# samples and the identity scoring during training).
SECTIONS = ("model", "lora", "train", "generate", "eval")
# Settings the page sets itself: the base model has its own picker; Start and Resume decide resume/overwrite;
# generate's own inputs (LoRAs, prompts, images) belong to the Generate page.
MANAGED = {
    "model.base",
    "train.resume",
    "train.overwrite",
    "generate.loras",
    "generate.prompts",
    "generate.n",
    "generate.fuse",
    "generate.compare",
    "generate.keep_face",
    "generate.init_image",
    "generate.reference",
    "generate.api_model",
    "generate.api_base_url",
    "generate.strength",
    "generate.save_steps",
    "generate.refiner",
    "generate.size",
}
MAIN = (
    "train.steps",
    "train.resolution",
    "lora.rank",
    "lora.alpha",
    "train.learning_rate",
    "train.optimizer",
    "lora.train_text_encoder",
    "train.checkpoint_every",
    "train.sample_every",
    "train.seed",
)


@dataclass(frozen=True)
class Setting:
    key: str  # section.name
    kind: str  # bool, choice, int, float, text, lines
    default: Any
    description: str
    optional: bool  # blank means "unset"
    choices: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.key


def settings() -> list[Setting]:
    """Every form setting, MAIN first (in its order), then the others in the config's order."""
    found = []
    for section in SECTIONS:
        model: type[BaseModel] = Config.model_fields[section].annotation  # type: ignore[assignment]
        for name, info in model.model_fields.items():
            key = f"{section}.{name}"
            if key in MANAGED:
                continue
            kind, choices, optional = _kind(info.annotation)
            default = info.get_default(call_default_factory=True)
            found.append(Setting(key, kind, _shown(default, kind), info.description or "", optional, choices))
    order = {key: i for i, key in enumerate(MAIN)}
    return sorted(found, key=lambda s: (order.get(s.key, len(order)), 0))


def _kind(annotation: Any) -> tuple[str, tuple[str, ...], bool]:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        annotation = next(arg for arg in args if arg is not type(None))
        args, origin = typing.get_args(annotation), typing.get_origin(annotation)
    if origin is Literal:
        return "choice", tuple(str(arg) for arg in args), optional
    if origin is list:
        return "lines", (), optional
    if annotation is bool and optional:  # a checkbox can't say "unset" (train.pivotal: the base decides)
        return "choice", ("", "true", "false"), optional
    if annotation is bool:
        return "bool", (), optional
    if annotation is int:
        return "int", (), optional
    if annotation is float:
        return "float", (), optional
    return "text", (), optional  # str, Path


def _shown(value: Any, kind: str) -> Any:
    """A config value as its input shows it."""
    if value is None:
        return None if kind in ("int", "float") else ""
    if kind == "lines":
        return "\n".join(str(item) for item in value)
    if isinstance(value, bool) and kind == "choice":
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    return value


def values_of(preset: Path | None) -> dict[str, Any]:
    """The form's values for a preset (None: the defaults)."""
    data = read_toml(preset) if preset is not None else {}
    shown = {}
    for setting in settings():
        section, name = setting.key.split(".", 1)
        value = data.get(section, {}).get(name, setting.default) if isinstance(data.get(section), dict) else None
        shown[setting.key] = setting.default if value is None else _shown(value, setting.kind)
    return shown


def preset_base(preset: Path | None) -> str | None:
    if preset is None:
        return None
    return read_toml(preset).get("model", {}).get("base")


def build_config(preset: Path | None, base: str, values: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """The config `sdlora train` will run: the preset's other sections < the form's values < `overrides`
    (what the page decides itself, e.g. model.base). Errors are one line naming the setting."""
    options: dict[str, Any] = {}
    if preset is not None:
        for section, table in read_toml(preset).items():
            if section not in SECTIONS and isinstance(table, dict):
                options.update({f"{section}.{key}": value for key, value in table.items()})
            elif isinstance(table, dict):  # managed settings of a form section keep the preset's value
                options.update({f"{section}.{k}": v for k, v in table.items() if f"{section}.{k}" in MANAGED})
    by_key = {setting.key: setting for setting in settings()}
    for key, raw in values.items():
        options[key] = _parsed(by_key[key], raw)
    options.update(overrides)
    options["model.base"] = base
    options.pop("train.resume", None)
    options.pop("train.overwrite", None)
    return load(None, options)


def _parsed(setting: Setting, raw: Any) -> Any:
    """An input's value as the config takes it; blank means unset (None: the default applies)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if setting.kind == "lines":
        return [line.strip() for line in str(raw).splitlines() if line.strip()]
    try:
        if setting.kind == "int":
            return int(float(raw)) if float(raw).is_integer() else raw  # pydantic names a fraction
        if setting.kind == "float":
            return float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{setting.key}: {raw!r} is not a number") from None
    return raw


def toml_of(config: Config) -> str:
    """The config.toml the run gets (as `sdlora train` stores it: no resume, no overwrite)."""
    stored = config.model_copy(update={"train": config.train.model_copy(update={"resume": None, "overwrite": False})})
    return to_toml(stored)

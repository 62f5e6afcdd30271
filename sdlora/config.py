"""The one typed config: the sections (sdlora/settings/) together, loading with precedence, the checks across
sections, saving.

Precedence, lowest first: field defaults < TOML file (`--config`) < explicit CLI options < `--set key=value`.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator

from sdlora.errors import ConfigError
from sdlora.fsutil import atomic_write_text
from sdlora.settings import (
    MAX_IMAGES,
    MAX_PIXELS,
    EvalConfig,
    GenerateConfig,
    LoraConfig,
    ModelConfig,
    PrepConfig,
    Section,
    TrainConfig,
    parse_size,
)

# The sections and the helpers callers have always imported from here.
__all__ = [
    "MAX_IMAGES",
    "MAX_PIXELS",
    "Config",
    "ConfigError",
    "EvalConfig",
    "GenerateConfig",
    "LoraConfig",
    "ModelConfig",
    "PrepConfig",
    "TrainConfig",
    "class_prompt_of",
    "load",
    "parse_size",
    "read_toml",
    "save",
    "to_toml",
]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Every section together, and the one check across sections (a class-image prompt from prep's class word).
class Config(Section):
    prep: PrepConfig = PrepConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _class_images_prompt(self) -> Config:
        """preservation = class_images with neither class_prompt nor class_dir: generate class images of the class
        word (what --class-prompt would have been)."""
        tc = self.train
        if tc.preservation != "class_images" or tc.class_prompt or tc.class_dir:
            return self
        train = tc.model_copy(update={"class_prompt": class_prompt_of(self)})
        return self.model_copy(update={"train": train})


def class_prompt_of(config: Config) -> str:
    """The prompt of prior preservation's class images: train.class_prompt, else "a photo of CLASS_WORD"."""
    return config.train.class_prompt or f"a photo of {config.prep.class_word}"


def load(
    path: Path | None = None,
    options: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
) -> Config:
    """Build the config: defaults < TOML at `path` < `options` ({"train.steps": 10}; None = not given) < `sets`."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path)
        _no_pickle_from(data, str(path))
    for dotted, value in (options or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value, origin="option")
    for item in sets:
        dotted, value = _parse_set(item)
        if dotted == "model.allow_pickle":
            _no_pickle_from({"model": {"allow_pickle": value}}, f"--set {item}")
        _set_dotted(data, dotted, value, origin="--set")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source=str(path) if path else "config")) from None


def _no_pickle_from(data: dict[str, Any], source: str) -> None:
    """Loading a pickle runs its code, so only the person at the command line may allow it: a config file
    (shared, downloaded, written by a run) or a --set saying `model.allow_pickle = true` is refused."""
    model = data.get("model")
    if isinstance(model, dict) and model.get("allow_pickle") not in (None, False):
        raise ConfigError(
            f"{source}: model.allow_pickle may only be given on the command line (--allow-pickle), "
            "because loading a pickle can run code; remove it from there"
        )


def read_toml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def save(config: Config, path: Path, given_only: Iterable[str] = ()) -> None:
    """Write the resolved config as JSON, atomically; sections (or section.key settings) in `given_only` are
    written only where given."""
    atomic_write_text(Path(path), json.dumps(_dump(config, given_only), indent=2) + "\n")


def _dump(config: Config, given_only: Iterable[str]) -> dict[str, Any]:
    """The config as JSON data; the sections in `given_only` without the settings nobody set, and the
    `section.key` settings in it left out when nobody set them (a model family's own defaults then still apply
    when the file is read back: sdlora.families.with_defaults)."""
    data = config.model_dump(mode="json")
    for name in given_only:
        section, _, key = name.partition(".")
        given = getattr(config, section)
        if not key:
            data[section] = given.model_dump(mode="json", exclude_unset=True)
        elif key not in given.model_fields_set:
            data[section].pop(key, None)
    return data


def to_toml(config: Config, given_only: Iterable[str] = ()) -> str:
    """The config as TOML (unset optional settings are left out: TOML has no null); see `_dump` for `given_only`."""
    import tomli_w

    def drop_none(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        return value

    data = _dump(config, given_only)
    data["model"]["allow_pickle"] = False  # a config file may not allow pickles (see _no_pickle_from)
    return tomli_w.dumps(drop_none(data))


def _parse_set(item: str) -> tuple[str, Any]:
    """'train.seed=3' -> ('train.seed', 3); the value is read as TOML, else kept as a string."""
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.learning_rate=3e-4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    section, _, key = dotted.partition(".")
    if section not in Config.model_fields:
        raise ConfigError(f"{origin} {dotted}: unknown section {section!r}{_suggest(section, Config.model_fields)}")
    target = data.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"{origin} {dotted}: [{section}] must be a table")
    target[key] = value


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(exc: ValidationError, source: str) -> str:
    """The first validation error as one line naming the key, with the closest valid key for typos."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    where = ".".join(loc) or "config"
    if error["type"] == "extra_forbidden":
        model: type[BaseModel] = Config
        for part in loc[:-1]:
            model = model.model_fields[part].annotation  # type: ignore[assignment]
        prefix = ".".join(loc[:-1] + [""])
        close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
        return f"{source}: unknown setting {where!r}{hint}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{source}: {where}: {message}"

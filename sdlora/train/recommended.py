"""The person defaults the identity benchmark chose: an unset train.pivotal and train.preservation = "auto" become
settings in the pre-flight, before any weights load, and the run's saved settings hold what they became.

The numbers (docs/identity-benchmark.md, "Likeness methods on three subjects"; mean of three held-out subjects at
800 steps): pivotal tuning with class-image preservation, 84% exact identity, no bleed, class validity +2 points;
the plain LoRA, 54% exact with 44% bleed. Pivotal tuning needs text encoders that take new tokens (not Flux.1,
whose prompt words reach the model through T5) and captions that name the trigger word. Without it, class images
alone held identity to 4% while output preservation alone cut bleed from 73% to 26% at 1,500 steps for the plain
LoRA's identity: so "auto" is class images with pivotal tuning, output preservation without. A bucketed dataset
(class images are square) takes output preservation too. On the benchmark's flow-matching base (a tiny Z-Image, issue
32) output preservation was again the one preservation that stops bleed and keeps the person, and class images
without pivotal tuning lost it: each family folder's DEFAULTS.md records the choice and its table.
"""

from __future__ import annotations

from typing import Any

PLAIN = "--no-pivotal --preservation none"  # the plain LoRA of earlier versions


def choose(
    pivotal: bool | None, preservation: str, takes_tokens: bool, names_trigger: bool, square: bool
) -> tuple[bool, str]:
    """(pivotal, preservation) from the settings as given: None and "auto" are the recommendation's, anything
    else stays as given."""
    if pivotal is None:
        pivotal = takes_tokens and names_trigger
    if preservation == "auto":
        preservation = "class_images" if pivotal and square else "output"
    return pivotal, preservation


def settle(
    config: Any, examples: list[Any], token: str, square: bool, out_dir: Any = None, family: Any = None
) -> tuple[Any, str | None]:
    """The config with train.pivotal and train.preservation settled, and a line saying what "unset" became (None
    when both were given). A resume keeps its run's own (`out_dir`'s saved settings; a run of an earlier version
    trained plain). Only an unset train.pivotal of a new run needs the base's family (read from its config files)."""
    from sdlora.config import class_prompt_of
    from sdlora.train.methods import pivotal as pivotal_tuning

    config = _as_saved(config, out_dir)
    tc = config.train
    if tc.pivotal is not None and tc.preservation != "auto":
        return config, None
    takes_tokens, label = True, ""
    if tc.pivotal is None:
        if family is None:  # the pre-flight passes the family it already read
            from sdlora.models import peek_family

            family = peek_family(config.model)
        takes_tokens, label = bool(family.embedding_keys), family.label
    names_trigger = pivotal_tuning.names_trigger(examples, token)
    pivotal, preservation = choose(tc.pivotal, tc.preservation, takes_tokens, names_trigger, square)
    update: dict[str, Any] = {"pivotal": pivotal, "preservation": preservation}
    if preservation == "class_images" and not (tc.class_prompt or tc.class_dir):
        update["class_prompt"] = class_prompt_of(config)
    settled = config.model_copy(update={"train": tc.model_copy(update=update)})
    return settled, _line(tc, settled.train, takes_tokens, names_trigger, square, label)


def _line(given: Any, tc: Any, takes_tokens: bool, names_trigger: bool, square: bool, label: str) -> str:
    parts = []
    if given.pivotal is None:
        if tc.pivotal:
            parts.append("pivotal tuning on")
        elif not takes_tokens:
            parts.append(f"pivotal tuning off ({label} takes no new tokens)")
        else:
            parts.append("pivotal tuning off (no caption names the trigger word)")
    if given.preservation == "auto":
        if tc.preservation == "class_images":
            source = f"from {tc.class_dir}" if tc.class_dir else f"{tc.class_prompt!r}, rendered once"
            parts.append(f"class-image preservation ({tc.num_class_images} class images, {source})")
        else:
            why = "" if tc.pivotal else ", as without pivotal tuning"
            why = why if square else ", as the dataset is bucketed and class images are square"
            parts.append(f"output preservation{why}")
    return f"recommended person settings: {', '.join(parts)}; {PLAIN} trains a plain LoRA"


def _as_saved(config: Any, out_dir: Any) -> Any:
    """At --resume, the unset recommended settings as the run in `out_dir` saved them (before they existed: plain)."""
    from sdlora.train.checkpoint import EARLIER, saved_config

    tc = config.train
    stored = saved_config(out_dir) if tc.resume and not tc.overwrite and out_dir is not None else None
    if stored is None:
        return config
    saved = {**EARLIER["train"], **(stored.get("train") if isinstance(stored.get("train"), dict) else {})}
    update: dict[str, Any] = {}
    if tc.pivotal is None and isinstance(saved.get("pivotal"), bool):
        update["pivotal"] = saved["pivotal"]
    if tc.preservation == "auto" and saved.get("preservation") in ("none", "class_images", "output"):
        update["preservation"] = saved["preservation"]
        if saved["preservation"] == "class_images" and not (tc.class_prompt or tc.class_dir):
            update["class_prompt"] = saved.get("class_prompt")
    return config.model_copy(update={"train": tc.model_copy(update=update)})

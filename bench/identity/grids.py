"""The identity benchmark's grid: the prompts every run is scored on, the cells (Setting), the size of a run (Scale),
the named grids and levers, and `combine` (several methods in one cell).

`run.py` runs these cells; `python -m bench.identity --grid NAME --combine A+B` picks them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bench.identity import base, edits
from bench.identity import captions as caption_study
from sdlora.faces import toyworld as world

# The trigger word of each base: one its text encoder never trained on. "sks" is one CLIP token that no caption of
# the UNet base holds; the DiT base's Qwen tokenizer reads bytes, and s and k are trained ("glasses", "skin": the
# base draws glasses on 92% of "sks person"), while j, m, q, v, x and z occur in no caption (their rows untrained).
TOKENS = {False: "sks", True: "zqx"}  # by base.is_flow
TRIGGER = f"{TOKENS[False]} person"
TRIGGERS = tuple(f"{token} person" for token in TOKENS.values())


def prompts(trigger: str = TRIGGER) -> dict[str, str]:
    """The shared prompts of a run whose subject is called `trigger`."""
    return {
        "identity": f"a photo of {trigger}",
        "class": base.CLASS_PROMPT,  # must NOT give the subject (bleed)
        "glasses": f"a photo of {trigger} with glasses",  # the subject, wearing glasses (prompt fidelity)
    }


PROMPTS = prompts()


def prompts_for(subject: world.Identity, trigger: str = TRIGGER) -> dict[str, str]:
    """Every prompt of a subject's run, in render order: the shared prompts, then its edits (edits.py: one change
    asked)."""
    return prompts(trigger) | edits.prompts(subject, trigger)


def trigger_of(config: Any) -> str:
    """The trigger of a run's config (prep.token and prep.class_word, as sdlora's captions name the subject)."""
    return f"{config.prep.token} {config.prep.class_word}"


@dataclass(frozen=True)
class Setting:
    """One cell of the grid."""

    prior: bool  # prior preservation with renders of other identities as class images
    text_encoder: bool  # LoRA on the text encoder too
    rank: int = 8
    lr: float = 3e-3
    options: tuple[tuple[str, Any], ...] = ()  # more sdlora settings ("train.masked_loss", True), ...
    label: str = ""  # the cell's name in tables and plots (default: its prior/te/rank/lr)
    captions: str = ""  # a caption study variant (captions.py: varied photos) or a named lever (the subject's own)
    class_captions: str = ""  # class images' own captions (IMG.txt, run.class_renders): "attributes" or "article"
    lora_scale: float = 1.0  # the LoRA's strength when the benchmark renders (sdlora generate's PATH:SCALE)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        on = {True: "on", False: "off"}
        return f"prior={on[self.prior]} te={on[self.text_encoder]} r{self.rank} lr{self.lr:g}"


@dataclass(frozen=True)
class Scale:
    """How big a run is: photos, seeds per prompt, sampling steps, checkpoints."""

    photos: int = 12
    seeds: int = 64
    sample_steps: int = 20
    cfg: float = 4.0
    checkpoints: tuple[int, ...] = (100, 200, 400, 800)
    batch_size: int = 4
    class_images: int = 64


REDUCED = [Setting(p, t) for p in (False, True) for t in (False, True)]
# The default run: every (prior, text encoder, rank) cell at one learning rate (toy learning rates do not transfer
# to real models, ranks and on/off choices may); `full` adds the second learning rate.
DEFAULT = [Setting(p, t, r) for p in (False, True) for t in (False, True) for r in (4, 16)]
FULL = [Setting(p, t, r, lr) for p in (False, True) for t in (False, True) for r in (4, 16) for lr in (1e-3, 3e-3)]


def _method(label: str, prior: bool = False, text_encoder: bool = False, **options: Any) -> Setting:
    """A cell of the methods grid: the plain LoRA (the smoke test's rank 16, lr 3e-3) plus one method's settings
    (keyword names: section__key, e.g. train__masked_loss=True)."""
    pairs = tuple((k.replace("__", "."), v) for k, v in options.items())
    return Setting(prior, text_encoder, rank=16, lr=3e-3, options=pairs, label=label)


# Every likeness method alone against the plain LoRA (issue 18); lr and strengths at the toy world's scale.
METHODS = [
    _method("plain"),
    _method("class_images", prior=True),
    replace(_method("class_captions", prior=True), class_captions="attributes"),  # regularisation captions (32)
    _method("output", train__preservation="output"),
    _method("masked", train__masked_loss=True),
    _method("masked+prior", train__masked_loss=True, train__mask_prior_weight=1.0),
    _method("pivotal", train__pivotal=True, train__pivotal_learning_rate=3e-3),
    _method("dora", lora__kind="dora"),
    _method("lokr", lora__kind="lokr"),
    _method("timestep_high", train__timestep_bias="high"),
    _method("flip", train__flip=True),
    _method("caption_dropout", train__caption_dropout=0.1),
    _method("text_encoder", text_encoder=True),
]
# The caption study (issue 31): the plain LoRA on varied photos, captioned three ways.
CAPTIONS = [Setting(False, False, rank=16, lr=3e-3, label=f"captions={v}", captions=v) for v in caption_study.VARIANTS]
# The methods grid on a flow-matching base (issue 32; the DiT base): the methods a flow family can take (no pivotal
# tuning: Z-Image, FLUX.2 [klein] and Qwen-Image have no CLIP; no text encoder LoRA), then every timestep-sampling
# scheme and a second shift (plain trains with the family's 'auto': for Z-Image the shift scheme at the scheduler's
# own shift, 3 on the DiT base); in the order a cut run measures them.
_BY_NAME = {m.name: m for m in METHODS}
FLOW = [
    *(_BY_NAME[name] for name in ("plain", "output", "class_images", "lokr", "dora")),
    _method("ts_uniform", train__timestep_sampling="uniform"),
    _method("ts_sigmoid", train__timestep_sampling="sigmoid"),  # the shift scheme at shift 1
    _method("ts_shift6", train__timestep_sampling="shift", train__timestep_shift=6.0),
    _method("ts_logit_normal", train__timestep_sampling="logit_normal"),
    *(_BY_NAME[name] for name in ("caption_dropout", "masked", "masked+prior")),
]
# Levers of the search for the bar (issue 32), to add to a combination (--combine pivotal+class_images+rank32).
LEVERS = [
    _method("rank4", lora__rank=4, lora__alpha=4.0),
    _method("rank32", lora__rank=32, lora__alpha=32.0),
    _method("lr1e-3", train__learning_rate=1e-3, train__text_encoder_learning_rate=1e-3 / 3),
    _method("pivotal_all", train__pivotal_fraction=1.0),  # the new tokens train to the end, not the first half
    _method("pivotal_short", train__pivotal_fraction=0.2),  # the new tokens train for the first fifth only
    # pivotal tuning with its tokens at a lower rate (instead of `pivotal`, whose 3e-3 is the LoRA's): rows that
    # move less from the class word's embedding, to hold less of the subject's colours; 3e-4 is sdlora's default
    *(_method(f"pivotal_lr{r}", train__pivotal=True, train__pivotal_learning_rate=float(r)) for r in ("1e-3", "3e-4")),
    _method("pw0.2", train__preservation_weight=0.2),  # a weaker output preservation (with output)
    _method("prior0.2", train__prior_loss_weight=0.2),  # a weaker class-image loss (with class_images)
    _method("prior2", train__prior_loss_weight=2.0),  # a stronger one: the class prompt held closer to the base's
    _method("te_lr3e-4", train__text_encoder_learning_rate=3e-4),  # the text-encoder LoRA at a third of its 1e-3
    replace(_method("named"), captions=caption_study.NAMED),  # half the captions name true attributes
    replace(_method("named_full"), captions=caption_study.NAMED_FULL),  # every caption names every one
    replace(_method("named3"), captions=caption_study.NAMED3),  # three in four name 1-3 (the base's share)
    *(replace(_method(f"scale{s:g}"), lora_scale=s) for s in (0.8, 0.6)),  # a weaker LoRA when rendering
    # class images captioned "a photo of a person", the prompt class validity is measured on, instead of sdlora's
    # DreamBooth-style "a photo of person" (the class word after "a photo of", as the trigger's "a photo of sks person")
    replace(_method("class_article", prior=True), class_captions="article"),
    _method("cfg7", generate__cfg=7.0),  # rendered at CFG 7 (sdlora generate's default) instead of the benchmark's 4
    # LoKr at its own factor (lora.lokr_factor; the lokr cell: peft's default, 8 x 8 (x) 16 x 16 on the DiT base's
    # 128-wide attention, 7,680 parameters at rank 16): f4 4 x 4 (x) 32 x 32, 24,960; f2 2 x 2 (x) 64 x 64 at rank
    # 16, more again. (A factor above a width's square root is not what it is on a real model: peft keeps it in w1
    # where LyCORIS swaps it, so f16 on the toy's 128 would be the default's shapes swapped.)
    # LoRA on the cross-attention's key and value only (lora.targets = "cross_attention"; Custom Diffusion's
    # layers): what the adapter adds is read from the prompt's tokens, so the attribute words keep a say
    _method("cross_kv", lora__targets="cross_attention"),
    _method("lokr_f4", lora__kind="lokr", lora__lokr_factor=4),
    _method("lokr_f2", lora__kind="lokr", lora__lokr_factor=2),
]
GRIDS = {"reduced": REDUCED, "default": DEFAULT, "full": FULL, "methods": METHODS, "captions": CAPTIONS, "flow": FLOW}


def combine(label: str) -> Setting:
    """The methods named in `label` ("class_images+timestep_high") at once: the union of their switches and
    settings (a setting two of them give differently is refused)."""
    by_name = {m.name: m for m in (*METHODS, *FLOW, *LEVERS)}
    parts, words = [], label.split("+")
    while words:  # the longest name first: a method's own name may hold a "+" ("masked+prior")
        size = next((n for n in range(len(words), 0, -1) if "+".join(words[:n]) in by_name), 0)
        if not size:
            raise ValueError(f"unknown method {words[0]!r}; choose from {', '.join(by_name)}")
        parts.append(by_name["+".join(words[:size])])
        words = words[size:]
    options: dict[str, Any] = {}
    for part in parts:
        for key, value in part.options:
            if options.setdefault(key, value) != value:
                raise ValueError(f"{label}: the methods set {key} differently")
    prior, text_encoder = any(p.prior for p in parts), any(p.text_encoder for p in parts)
    # Every method cell has the plain LoRA's rank and lr (_method), so the first part's stand for all.
    setting = replace(parts[0], prior=prior, text_encoder=text_encoder, options=tuple(options.items()), label=label)
    captions, class_captions = ({getattr(p, field) for p in parts} - {""} for field in ("captions", "class_captions"))
    if len(captions) > 1 or len(class_captions) > 1:
        raise ValueError(
            f"{label}: the methods caption the {'photos' if len(captions) > 1 else 'class images'} differently"
        )
    scale = min(p.lora_scale for p in parts)
    return replace(setting, class_captions="".join(class_captions), captions="".join(captions), lora_scale=scale)

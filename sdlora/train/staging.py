"""Big frozen parts kept out of the way, for families whose text encoders and VAE would not fit beside the denoiser
(Flux.1's T5-XXL is 9.5 GB in bf16, its transformer 24 GB): before the denoiser loads, each frozen text encoder
loads alone, encodes every caption and every prompt training will render (sample grids, identity scoring, class
images) and is freed before the next one loads; then the pipeline loads without them. So neither the device nor
system RAM ever holds two of them, or one beside the denoiser. Renders read the cached conditioning. The VAE stays
in CPU RAM and visits the device only to be cached."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora.train import controls

if TYPE_CHECKING:
    from sdlora.config import Config
    from sdlora.families import Family
    from sdlora.train.state import Plan


def frozen_encoders(config: Config, family: Family) -> list[str]:
    """The text encoders a staged family loads apart, one at a time (all but a trained CLIP-L); [] otherwise."""
    if not family.stage_frozen:
        return []
    trained = family.trainable_text_encoders if config.lora.train_text_encoder else ()
    return [name for name in family.text_encoders if name not in trained]


def staged_parts(config: Config, family: Family) -> list[str]:
    """Pipeline attributes that stay on the CPU: with cached latents, the VAE of a staged family; [] for families
    that keep everything on the device (SD, SDXL: train.offload moves parts afterwards)."""
    return ["vae"] if family.stage_frozen and config.train.cache_latents else []


def load_base(config: Config, torch_dtype: Any) -> Any:
    """The base pipeline, without the text encoders a staged family loads apart (peeked before any weight loads)."""
    from sdlora import models

    without = frozen_encoders(config, models.peek_family(config.model))
    return models.load_base(config.model, torch_dtype, without=without)


@contextlib.contextmanager
def visiting(pipe: Any, names: Sequence[str], device: Any) -> Iterator[None]:
    """`names` on `device` for the block, back in CPU RAM afterwards."""
    for name in names:
        getattr(pipe, name).to(device)
    try:
        yield
    finally:
        for name in names:
            getattr(pipe, name).to("cpu")
        if names and getattr(device, "type", str(device)) == "cuda":
            import torch

            torch.cuda.empty_cache()


def release(pipe: Any, names: Sequence[str]) -> None:
    """Drop `names` from the pipeline and free their memory (nothing renders with them any more)."""
    for name in names:
        setattr(pipe, name, None)
    gc.collect()


def render_batches(config: Config, plan: Plan) -> list[list[str]]:
    """The prompt batches training will render, each as render_images will batch it (so that each prompt's cached
    conditioning is bit for bit what the pipeline would compute): the sample grids, what the likeness methods
    render (the class images of prior preservation), identity scoring's prompt set where scoring is on
    (identity.cadence: by default only on a prep dataset); then the negative prompts as each of those batches
    encodes them (true CFG's renders need them)."""
    from sdlora.evaluation.prompts import default_templates, expand
    from sdlora.train import identity, methods

    tc, size, trigger = config.train, config.generate.batch_size, plan.trigger
    lists = [[p.replace("{trigger}", trigger) for p in tc.sample_prompts]] if tc.sample_every else []
    for method in methods.active(tc):
        lists += method.rendered_prompts(config, plan)
    if identity.cadence(config, plan.dataset_dir)[0] is not None:
        templates = default_templates(config.eval.face_model, config.eval.clip)
        lists.append(expand(templates, config.eval.n, config.eval.seed, trigger)[1])
    batches = [prompts[i : i + size] for prompts in lists for i in range(0, len(prompts), size)]
    negatives = sorted({config.generate.negative, ""})  # the grids' negative prompt; class images render with ""
    return batches + [[negative] * len(batch) for batch in batches for negative in negatives]


@dataclass(frozen=True)
class Cached:
    """What the frozen text encoders left behind: the captions' table (sdlora.train.batches' text cache: captions,
    class prompt, "") and each render prompt's rows ({prompt: {"encoder_hidden_states": ..., ...}})."""

    captions: dict[str, Any]
    rows: dict[str, Any]


def encode_first(config: Config, plan: Plan, accelerator: Any, torch_dtype: Any) -> Cached | None:
    """For a staged family, before the denoiser loads (so that RAM holds the larger of T5 and the transformer, not
    both): each frozen text encoder alone (encode_apart), with the tokenizers and the denoiser's config only.
    None for families that keep their encoders."""
    from types import SimpleNamespace

    from diffusers import DiffusionPipeline
    from diffusers.configuration_utils import FrozenDict

    from sdlora import models

    family = models.peek_family(config.model)
    if not frozen_encoders(config, family):
        return None
    tokenizers = [name.replace("text_encoder", "tokenizer") for name in family.text_encoders]
    edit = controls.wanted(plan.examples, family)
    light = SimpleNamespace(**{name: models.load_component(config.model, name) for name in tokenizers})
    if edit:  # the Edit pipeline's processor, and model_index.json as its `config` (which pipeline: its template)
        light.processor = models.load_component(config.model, "processor")
        light.config = FrozenDict(DiffusionPipeline.load_config(models.components_root(config.model)))
    setattr(light, family.denoiser, SimpleNamespace(config=models.component_config(config.model, family.denoiser)))
    return encode_apart(config, plan, light, family, accelerator, torch_dtype)


def use(pipe: Any, family: Family, cached: Cached | None) -> dict[str, Any] | None:
    """Make `pipe` render from the cached rows; the captions' table for the batches (None without a cache)."""
    if cached is None:
        return None
    family.render_from_cache(pipe, cached.rows)
    return cached.captions


def encode_apart(
    config: Config, plan: Plan, pipe: Any, family: Family, accelerator: Any, torch_dtype: Any = None
) -> Cached | None:
    """Load each frozen text encoder alone (or take it from `pipe`, dropping it there), cache the captions'
    conditioning and the renders' (render_batches) on the device, free it, load the next. None when the family
    loads none apart."""
    import torch

    from sdlora import families, models
    from sdlora.train import methods
    from sdlora.train.batches import build_text_cache, merge_text_caches

    names = frozen_encoders(config, family)
    if not names:
        return None
    device = accelerator.device
    # The captions, the methods' prompts (prior preservation's class prompt, output preservation's), "" (caption
    # dropout): one table, as set-up's batches read it.
    extra = [prompt for method in methods.active(config.train) for prompt in method.cached_prompts(config, plan)]
    prompts = [e.caption for e in plan.examples] + extra + [""]
    batches = render_batches(config, plan)
    tokenizers = families.tokenizers(pipe, family)
    tokens = family.sequence_length(pipe, config.model.max_sequence_length)
    parts, rows, edits = [], {}, None
    for name in names:
        encoder = getattr(pipe, name, None) or models.load_text_encoder(config.model, name, torch_dtype)
        release(pipe, [name])  # the pipeline never holds it: the local name is its only reference
        encoder.requires_grad_(False).to(device)
        alone = [encoder if other == name else None for other in family.text_encoders]
        parts.append(build_text_cache(family, tokenizers, alone, prompts, tokens))
        if controls.wanted(plan.examples, family) and edits is None:  # the captions with control images too
            edits = controls.build_cache(family, pipe, encoder, plan.examples, config.train)
        with torch.no_grad(), accelerator.autocast():  # as the renders run: under the accelerator's autocast
            for batch in batches:
                cond = family.encode_prompts(tokenizers, alone, batch, tokens)
                for i, prompt in enumerate(batch):
                    # in the encoder's dtype, as FluxPipeline casts its outputs
                    row = {k: v[i].to(encoder.dtype) for k, v in cond.items()}
                    rows.setdefault(prompt, {}).setdefault(name, row)
        del encoder, alone
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    merged = {prompt: {k: v for part in by_name.values() for k, v in part.items()} for prompt, by_name in rows.items()}
    captions = merge_text_caches(parts)
    return Cached(captions if edits is None else controls.join(captions, edits), merged)

"""What training writes besides checkpoints: the LoRA files (diffusers and kohya format) and sample grids."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora import __version__, layout

if TYPE_CHECKING:
    from sdlora.train.methods import Files
    from sdlora.train.state import Run


def save_loras(run: Run, folder: Path, *, unwrap_for_good: bool) -> tuple[Path, Path]:
    """pytorch_lora_weights.safetensors (diffusers, with adapter metadata and our header keys) and NAME.safetensors
    (kohya) into `folder`. `unwrap_for_good` drops Accelerate's autocast wrapper (after the last step only)."""
    import torch

    from sdlora.lora import embeddings, kohya, peft

    unwrap = run.accelerator.unwrap_model
    denoiser = unwrap(run.denoiser, keep_fp32_wrapper=not unwrap_for_good)
    encoders = {
        name: unwrap(encoder, keep_fp32_wrapper=not unwrap_for_good) for name, encoder in run.text_encoders.items()
    }
    header = {
        "sdlora.trigger_phrase": run.plan.trigger,
        "sdlora.family": run.info.family,
        "sdlora.version": __version__,
    } | provenance(run)
    diffusers_file = Path(folder) / layout.DIFFUSERS_LORA
    models = {run.family.denoiser: denoiser} | encoders
    files = method_files(run, folder, header)  # e.g. pivotal tuning: NAME_emb.safetensors
    comfyui = run.family.comfyui_diffusers_file
    more, extra = files.diffusers_metadata, files.diffusers_tensors
    peft.save_diffusers(diffusers_file, type(run.pipe), models, header | more, for_comfyui=comfyui, extra=extra)
    metadata = kohya_metadata(run, models, files.kohya_metadata | provenance(run))
    kohya_file = Path(folder) / layout.kohya_file(run.plan.name)
    # fp32, not the UIs' usual fp16: the file then reproduces the trained model (fp16 weights missed 1e-4).
    state = kohya.kohya_state_dict(denoiser, list(encoders.values()), run.family, dtype=torch.float32)
    kohya.save_kohya(kohya_file, state, metadata)
    save_workflow(run, folder, text_encoders=len(models) > 1, pivotal_word=more.get(embeddings.WORD_KEY))
    return diffusers_file, kohya_file


def provenance(run: Run) -> dict[str, str]:
    """What the LoRA was trained on (base as given, variant, distilled or not) and with which training adapter
    (model.training_adapter: its path or hub id, and a file's sha256), as JSON values of both files' metadata;
    and a quantized base's --quantize (sdlora.quantize)."""
    import json

    base = {"base": run.config.model.base, "variant": run.info.variant, "distilled": run.info.distilled}
    found = {"sdlora.trained_on": json.dumps(base)}
    if run.plan.training_adapter:
        found["sdlora.training_adapter"] = json.dumps(run.plan.training_adapter)
    if run.config.model.quantize != "none":  # the frozen base it learned against (nf4, int8, fp8)
        found["sdlora.quantize"] = run.config.model.quantize
    return found


def save_workflow(run: Run, folder: Path, *, text_encoders: bool, pivotal_word: str | None) -> Path:
    """NAME.comfyui.json: the ComfyUI workflow that renders the run's sample prompts as its sample grids do (the
    same sampling settings, the LoRA file NAME.safetensors at strength 1, pivotal tokens as `embedding:NAME_emb`)."""
    from sdlora.comfyui import workflow
    from sdlora.generate.render import Sampling, for_family

    name = run.plan.name
    s = for_family(Sampling.for_training(run.config), run.family, run.pipe)
    embedding = (pivotal_word, Path(layout.embedding_file(name)).stem) if pivotal_word else None
    lora = workflow.LoraFile(layout.kohya_file(name), 1.0, text_encoders, embedding)
    settings = workflow.Settings(s.steps, s.cfg, s.scheduler, s.width, s.height, s.negative)
    parts = run.family.comfyui_parts(run.pipe, str(run.config.model.base), s.width, s.height, s.cfg)
    prompts = [p.replace("{trigger}", run.plan.trigger) for p in run.config.train.sample_prompts]
    images = [(prompt, run.config.generate.seed) for prompt in prompts]
    path = Path(folder) / layout.comfyui_workflow(name)
    workflow.save(path, workflow.build(parts, [lora], settings, images, prefix=name, vae=run.config.model.vae))
    return path


def method_files(run: Run, folder: Path, header: dict[str, str]) -> Files:
    """What the active likeness methods write beside the LoRA files and add to them."""
    from sdlora.train import methods

    found = methods.Files()
    for method in methods.active(run.config.train):
        files = method.write_files(run.methods.get(method.name), folder, run.plan.name, header)
        found = methods.Files(
            found.diffusers_tensors | files.diffusers_tensors,
            found.diffusers_metadata | files.diffusers_metadata,
            found.kohya_metadata | files.kohya_metadata,
        )
    return found


def kohya_metadata(run: Run, models: dict[str, Any], more: dict[str, str]) -> dict[str, str]:
    """kohya's ss_* and modelspec keys of the run, LyCORIS's for a DoRA or LoKr adapter, and `more` (the
    methods'). `models`: the unwrapped adapted models by pipeline attribute, the denoiser first."""
    from sdlora.lora import kohya, peft

    lc, tc = run.config.lora, run.config.train
    denoiser = models[run.family.denoiser]
    return kohya.build_metadata(
        run.info,
        name=run.plan.name,
        rank=lc.rank,
        alpha=lc.alpha,
        steps=tc.steps,
        learning_rate=tc.learning_rate,
        resolution=tc.resolution,
        num_train_images=len(run.plan.examples),
        trigger_phrase=run.plan.trigger,
        started_at=run.started_at,
        finished_at=time.time(),
        text_encoder_trained=len(models) > 1,
        extra=kohya.flow_metadata(
            run.info, tc, run.family.sequence_length(run.pipe, run.config.model.max_sequence_length)
        )
        | kohya.adapter_metadata(peft.adapter_kind(denoiser), {n: peft.adapter_metadata(m) for n, m in models.items()})
        | more,
    )


def render_samples(run: Run, step: int) -> None:
    """A grid of the sample prompts (one column each, the config's generate seed) via `sdlora generate`'s code."""
    from sdlora.fsutil import atomic_path
    from sdlora.generate.render import Sampling, make_grid, render_images
    from sdlora.train.fsdp import sharded

    main = run.accelerator.is_main_process
    if main or sharded(run.accelerator):  # FSDP: every process takes part in each forward of the sharded denoiser
        prompts = [p.replace("{trigger}", run.plan.trigger) for p in run.config.train.sample_prompts]
        seeds = [run.config.generate.seed] * len(prompts)
        with rendering(run):
            images = render_images(run.pipe, prompts, seeds, Sampling.for_training(run.config))
    if main:
        with atomic_path(run.plan.out_dir / layout.SAMPLES / layout.sample_grid(step)) as tmp:
            make_grid(images, cols=len(images)).save(tmp, format="PNG")
    run.accelerator.wait_for_everyone()


@contextlib.contextmanager
def rendering(run: Run) -> Iterator[None]:
    """Render with the LoRA in training: trained modules in eval mode (no LoRA dropout), offloaded encoders and VAE
    back on the device, under autocast (Accelerate's wrapper returns the UNet's output in fp32, which a half VAE
    would refuse); all restored afterwards."""
    from sdlora.lora import training_adapter

    trained = [getattr(run.pipe, name) for name in (run.family.denoiser, *run.text_encoders)]
    for module in trained:
        module.eval()
    for name in run.offloaded:
        getattr(run.pipe, name).to(run.accelerator.device)
    # The distilled base + the trained LoRA, as users will render it: the training adapter left out.
    left_out = training_adapter.left_out(trained[:1]) if run.config.model.training_adapter else contextlib.nullcontext()
    try:
        with run.accelerator.autocast(), left_out:
            yield
    finally:
        for module in trained:
            module.train()
        for name in run.offloaded:
            getattr(run.pipe, name).to("cpu")

"""ComfyUI's side of bench/parity.py: load a tiny SD checkpoint into ComfyUI and run an sdlora workflow file
through ComfyUI's own node classes.

ComfyUI detects a UNet's widths from its weights (`comfy.model_detection.detect_unet_config`), but matches them
only against the published models (SD 1.5's context 768, ...), builds CLIP from the published configs and the VAE
with SD's fixed channels and 32-group norms. For a tiny checkpoint (`tiny_loading`) we therefore hand ComfyUI:
- the model class of the family (SD15 / SD20) over the UNet config ComfyUI itself detected from the file;
- CLIP from the same file, with the tiny text encoder's transformers config as its `textmodel_json_config`;
- the VAE's channels, and the group count of GroupNorm where the tiny model has no 32 groups;
- the latent scale of the tiny VAE (`scaling_factor`), where SD's is 0.18215;
- EmptyLatentImage at the VAE's own downsampling (the toy base's is 4x; ComfyUI's node divides by 8).
Everything else (the checkpoint and LoRA loaders, key mapping, weight patching, text encoding, KSampler and its
samplers and schedules, VAE decoding) is ComfyUI's own code, run node by node in the workflow's link order
(`execute`): the API-format graph is what ComfyUI's server would get; its executor adds caching and a queue.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def import_comfy(checkout: Path) -> None:
    """Import ComfyUI from `checkout` on the CPU; torchvision (which ComfyUI imports for models not used here and
    our stack lacks) is a stand-in module while comfy imports."""
    sys.path.insert(0, str(checkout))
    from comfy.cli_args import args

    args.cpu = True
    args.disable_all_custom_nodes = True
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    stub = importlib.util.find_spec("torchvision") is None
    names = ("torchvision", "torchvision.models", "torchvision.transforms")
    if stub:
        for name in names:
            sys.modules[name] = types.ModuleType(name)
    try:
        import comfy.sd  # noqa: F401
        import nodes  # noqa: F401
    finally:
        if stub:
            for name in names:
                sys.modules.pop(name, None)


@contextlib.contextmanager
def group_norms(groups: int) -> Iterator[None]:
    """Every GroupNorm made inside asks for 32 groups (ComfyUI's SD modules hard-code it): use `groups`."""
    original = torch.nn.GroupNorm.__init__

    def init(self, num_groups, num_channels, *args, **kwargs):
        original(self, groups if num_groups == 32 else num_groups, num_channels, *args, **kwargs)

    torch.nn.GroupNorm.__init__ = init
    try:
        yield
    finally:
        torch.nn.GroupNorm.__init__ = original


@contextlib.contextmanager
def tiny_loading(family: str, folder: Path, workdir: Path, clip_reading: str = "comfyui") -> Iterator[None]:
    """While open, ComfyUI's checkpoint loader reads the tiny pipeline saved in diffusers `folder` (its configs)
    from its single file: the model class, CLIP config, VAE channels, group norms and latent scale given above."""
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models

    unet = json.loads((folder / "unet/config.json").read_text())
    vae = json.loads((folder / "vae/config.json").read_text())
    if family not in ("sd1", "sd2", "sdxl"):
        raise SystemExit(f"{family}: no tiny ComfyUI loading here (SD 1.x, SD 2.x, SDXL; Flux: parity_flux)")
    clip_configs = {}
    for name in ("text_encoder", "text_encoder_2"):
        if (folder / name / "config.json").exists():
            clip_configs[name] = workdir / f"{name}_config.json"
            clip_configs[name].write_text((folder / name / "config.json").read_text())
    original_detect = comfy.model_detection.model_config_from_unet
    scale = vae.get("scaling_factor", 0.18215)

    def detect(state_dict, prefix, *args, **kwargs):
        unet_config = comfy.model_detection.detect_unet_config(state_dict, prefix)
        if family == "sd1":
            config = comfy.supported_models.SD15(unet_config)
            config.unet_config["num_heads"] = unet["attention_head_dim"]  # diffusers' SD 1.x name for the heads
            config.latent_format = comfy.latent_formats.SD15(scale_factor=scale)
            target = sd1_clip_target(clip_configs["text_encoder"])
        elif family == "sd2":
            config = comfy.supported_models.SD20(unet_config)
            config.unet_config |= {"num_heads": -1, "num_head_channels": head_width(unet)}
            config.latent_format = comfy.latent_formats.SD15(scale_factor=scale)
            target = sd2_clip_target(clip_configs["text_encoder"], as_pipeline=clip_reading == "pipeline")
        else:
            config = comfy.supported_models.SDXL(unet_config)
            config.unet_config |= {"num_heads": -1, "num_head_channels": head_width(unet)}
            config.latent_format = comfy.latent_formats.SDXL()
            config.latent_format.scale_factor = scale
            target = sdxl_clip_target(clip_configs["text_encoder"], clip_configs["text_encoder_2"])
        get_model = config.get_model

        def build(*a, **k):
            with group_norms(unet.get("norm_num_groups", 32)):
                model = get_model(*a, **k)
            if family == "sdxl":  # ComfyUI's SDXL embeds each time id in 256 channels; the tiny UNet in fewer
                from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

                model.embedder = Timestep(unet["addition_time_embed_dim"])
            return model

        config.get_model = build
        config.clip_target = lambda state_dict={}: target  # noqa: B006 (ComfyUI's own signature)
        return config

    import nodes

    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    original_latent = nodes.EmptyLatentImage.generate

    def empty_latent(self, width, height, batch_size=1):  # ComfyUI's divides by 8; the toy VAE downsamples 4x
        return ({"samples": torch.zeros([batch_size, 4, height // factor, width // factor])},)

    comfy.model_detection.model_config_from_unet = detect
    nodes.EmptyLatentImage.generate = empty_latent
    try:
        with vae_loading(folder):
            yield
    finally:
        comfy.model_detection.model_config_from_unet = original_detect
        nodes.EmptyLatentImage.generate = original_latent


@contextlib.contextmanager
def vae_loading(folder: Path) -> Iterator[None]:
    """While open, ComfyUI's VAE is built with the channels and GroupNorm groups of the tiny VAE in `folder`."""
    import comfy.sd

    vae = json.loads((folder / "vae/config.json").read_text())
    original_vae = comfy.sd.VAE.__init__

    def vae_init(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        channels = vae["block_out_channels"]
        ddconfig = {
            "double_z": True, "z_channels": vae["latent_channels"], "resolution": 256, "in_channels": 3,
            "out_ch": 3, "ch": channels[0], "ch_mult": [c // channels[0] for c in channels],
            "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0,
        }  # fmt: skip
        params = {"ddconfig": ddconfig, "embed_dim": vae["latent_channels"]}
        with group_norms(vae.get("norm_num_groups", 32)):
            original_vae(self, sd=sd, device=device, config={"params": params}, dtype=dtype, metadata=metadata)
        self.downscale_ratio = self.upscale_ratio = 2 ** (len(channels) - 1)

    comfy.sd.VAE.__init__ = vae_init
    try:
        yield
    finally:
        comfy.sd.VAE.__init__ = original_vae


def sd1_clip_target(config: Path) -> Any:
    """ComfyUI's SD 1.x CLIP (CLIP-L, last layer) over the tiny text encoder's config."""
    import comfy.sd1_clip
    import comfy.supported_models_base

    clip_model = functools.partial(
        comfy.sd1_clip.SDClipModel, textmodel_json_config=str(config), return_projected_pooled=False
    )
    width = json.loads(config.read_text())["hidden_size"]  # an `embedding:` file's vectors must have it (not 768)
    token = functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=width)
    return comfy.supported_models_base.ClipTarget(
        functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=token),
        functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=clip_model),
    )


def head_width(unet: dict[str, Any]) -> int:
    """The one head width of a UNet whose diffusers config gives per-level head counts (SD 2.x, SDXL)."""
    heads = unet["attention_head_dim"]
    widths = {c // h for c, h in zip(unet["block_out_channels"], heads, strict=True)}
    assert len(widths) == 1, f"per-level head widths differ: {widths}"
    return widths.pop()


def sd2_clip_target(config: Path, as_pipeline: bool) -> Any:
    """ComfyUI's SD 2.x CLIP-H (sd2_clip: the penultimate layer with the final norm, `!` (id 0) padding) over the
    tiny text encoder's config; `as_pipeline`: read as the tiny diffusers pipeline reads its encoder instead (the
    last layer, padded with end-of-text), which the published SD 2.x text encoder makes the same as ComfyUI's."""
    import comfy.sd1_clip
    import comfy.supported_models_base

    layer = {"layer": "last"} if as_pipeline else {"layer": "hidden", "layer_idx": -2}
    clip_model = functools.partial(
        comfy.sd1_clip.SDClipModel, **layer, textmodel_json_config=str(config),
        special_tokens={"start": 49406, "end": 49407, "pad": 49407 if as_pipeline else 0},
        return_projected_pooled=False,
    )  # fmt: skip
    token = functools.partial(comfy.sd1_clip.SDTokenizer, pad_with_end=as_pipeline, embedding_key="clip_h")
    tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, clip_name="h", tokenizer=token)
    clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_name="h", clip_model=clip_model)
    return comfy.supported_models_base.ClipTarget(tokenizer, clip)


def sdxl_clip_target(config_l: Path, config_g: Path) -> Any:
    """ComfyUI's SDXL CLIP (sdxl_clip.SDXLClipModel: clip_l and clip_g, penultimate layer, clip_g's pooled
    projection, its "!" padding) over the tiny text encoders' configs: only the configs are swapped."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
            torch.nn.Module.__init__(self)
            common = {"layer": "hidden", "layer_idx": -2, "device": device, "dtype": dtype}
            common["layer_norm_hidden_state"] = False
            self.clip_l = comfy.sd1_clip.SDClipModel(
                **common, textmodel_json_config=str(config_l), model_options=model_options
            )
            self.clip_g = comfy.sd1_clip.SDClipModel(
                **common,
                textmodel_json_config=str(config_g),
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
                return_projected_pooled=True,
                model_options={**model_options, "model_name": "clip_g"},
            )
            self.dtypes = {dtype}

    return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClip)


def node_classes() -> dict[str, Any]:
    import nodes

    classes = dict(nodes.NODE_CLASS_MAPPINGS)
    with contextlib.suppress(Exception):  # ModelSamplingDiscrete & co (v-prediction)
        from comfy_extras import nodes_model_advanced

        classes |= getattr(nodes_model_advanced, "NODE_CLASS_MAPPINGS", {})
    with contextlib.suppress(Exception):  # FluxGuidance, EmptySD3LatentImage
        from comfy_extras import nodes_flux, nodes_sd3

        classes |= {"FluxGuidance": nodes_flux.FluxGuidance, "EmptySD3LatentImage": nodes_sd3.EmptySD3LatentImage}
    return classes


def execute(workflow: dict[str, dict[str, Any]], folders: dict[str, Path]) -> dict[str, Any]:
    """Run `workflow` (API format) through ComfyUI's node classes, each node once, inputs first. SaveImage nodes
    hand back their images instead of writing them: {SaveImage's filename_prefix: (1, H, W, 3) float in [0, 1]}.
    Also returns, under "_weights", `patched_weights` of the last LoRA node's MODEL and CLIP."""
    import folder_paths

    for kind, folder in folders.items():
        folder_paths.add_model_folder_path(kind, str(folder), is_default=True)
    classes = node_classes()
    done: dict[str, tuple] = {}
    saved: dict[str, Any] = {}

    def run(key: str) -> tuple:
        if key in done:
            return done[key]
        spec = workflow[key]
        inputs = {
            name: run(value[0])[value[1]] if isinstance(value, list) and len(value) == 2 else value
            for name, value in spec["inputs"].items()
        }
        if spec["class_type"] == "SaveImage":
            saved[inputs["filename_prefix"]] = inputs["images"]
            done[key] = ()
            return ()
        cls = classes[spec["class_type"]]
        if hasattr(cls, "FUNCTION"):
            done[key] = getattr(cls(), cls.FUNCTION)(**inputs)
        else:  # ComfyUI's V3 nodes (comfy_api io.ComfyNode): a classmethod `execute` giving a NodeOutput
            done[key] = cls.execute(**inputs).result
        if spec["class_type"] in ("LoraLoader", "LoraLoaderModelOnly"):  # before sampling patches in place
            saved["_weights"] = patched_weights(done[key][0], done[key][1] if len(done[key]) > 1 else None)
        return done[key]

    with torch.inference_mode():
        for key in workflow:
            run(key)
    return saved


@contextlib.contextmanager
def recorded_noise() -> Iterator[list[tuple[int, torch.Tensor]]]:
    """The initial noise ComfyUI's KSampler draws, per seed (comfy.sample.prepare_noise), recorded."""
    import comfy.sample

    original = comfy.sample.prepare_noise
    seen: list[tuple[int, torch.Tensor]] = []

    def prepare(latent_image, seed, noise_inds=None):
        noise = original(latent_image, seed, noise_inds)
        seen.append((seed, noise.clone()))
        return noise

    comfy.sample.prepare_noise = prepare
    try:
        yield seen
    finally:
        comfy.sample.prepare_noise = original


def patched_weights(model: Any, clip: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{ComfyUI's name: (ComfyUI's weight, the weight it samples with)} for every weight its LoRA loader patched:
    the patches applied by comfy.lora.calculate_weight, under ComfyUI's module names (diffusion_model.*,
    clip_l.transformer.*, clip_g.transformer.*; `comfy_names` maps a checkpoint to them). Call it before
    sampling: ComfyUI patches its weights in place to sample."""
    import comfy.lora
    import comfy.utils

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for patcher in (model, clip.patcher if clip is not None else None):
        if patcher is None:
            continue
        for key, patches in patcher.patches.items():
            weight = comfy.utils.get_attr(patcher.model, key).detach().float()
            merged = comfy.lora.calculate_weight(patches, weight.clone(), key)
            out[key] = (weight, merged)
    return out


def comfy_names(family: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A single-file checkpoint's weights under ComfyUI's module names, converted by ComfyUI's own code (the
    family's process_clip_state_dict: SDXL's OpenCLIP in_proj split into q/k/v, ...)."""
    import comfy.supported_models

    if family == "flux":  # BFL's transformer file (parity_flux.with_clip_l: and CLIP-L under ComfyUI's names)
        return {k if k.startswith("clip_l.") else "diffusion_model." + k: v for k, v in state_dict.items()}
    if family not in ("sd1", "sd2", "sdxl"):  # a DiT's transformer file (BFL's, Z-Image's, Qwen-Image's): the model
        return {"diffusion_model." + k: v for k, v in state_dict.items()}
    models = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20}
    config = (models | {"sdxl": comfy.supported_models.SDXL})[family]({})
    unet = {
        "diffusion_model." + k.removeprefix("model.diffusion_model."): v
        for k, v in state_dict.items()
        if k.startswith("model.diffusion_model.")
    }
    return unet | config.process_clip_state_dict(dict(state_dict))

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
def tiny_loading(family: str, folder: Path, workdir: Path) -> Iterator[None]:
    """While open, ComfyUI's checkpoint loader reads the tiny pipeline saved in diffusers `folder` (its configs)
    from its single file: the model class, CLIP config, VAE channels, group norms and latent scale given above."""
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    unet = json.loads((folder / "unet/config.json").read_text())
    vae = json.loads((folder / "vae/config.json").read_text())
    text = json.loads((folder / "text_encoder/config.json").read_text())
    clip_config = workdir / "clip_config.json"
    clip_config.write_text(json.dumps(text))
    if family != "sd1":
        raise SystemExit(f"{family}: no tiny ComfyUI loading yet (SD 1.x only)")
    original_detect = comfy.model_detection.model_config_from_unet
    original_vae = comfy.sd.VAE.__init__

    def detect(state_dict, prefix, *args, **kwargs):
        unet_config = comfy.model_detection.detect_unet_config(state_dict, prefix)
        config = comfy.supported_models.SD15(unet_config)
        config.unet_config["num_heads"] = unet["attention_head_dim"]  # diffusers' SD 1.x name for the head count
        config.latent_format = comfy.latent_formats.SD15(scale_factor=vae.get("scaling_factor", 0.18215))
        get_model = config.get_model

        def build(*a, **k):
            with group_norms(unet.get("norm_num_groups", 32)):
                return get_model(*a, **k)

        clip_model = functools.partial(
            comfy.sd1_clip.SDClipModel,
            textmodel_json_config=str(clip_config),
            return_projected_pooled=False,
        )
        target = comfy.supported_models_base.ClipTarget(
            comfy.sd1_clip.SD1Tokenizer, functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=clip_model)
        )
        config.get_model = build
        config.clip_target = lambda state_dict={}: target  # noqa: B006 (ComfyUI's own signature)
        return config

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

    import nodes

    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    original_latent = nodes.EmptyLatentImage.generate

    def empty_latent(self, width, height, batch_size=1):  # ComfyUI's divides by 8; the toy VAE downsamples 4x
        return ({"samples": torch.zeros([batch_size, 4, height // factor, width // factor])},)

    comfy.model_detection.model_config_from_unet = detect
    comfy.sd.VAE.__init__ = vae_init
    nodes.EmptyLatentImage.generate = empty_latent
    try:
        yield
    finally:
        comfy.model_detection.model_config_from_unet = original_detect
        comfy.sd.VAE.__init__ = original_vae
        nodes.EmptyLatentImage.generate = original_latent


def node_classes() -> dict[str, Any]:
    import nodes

    classes = dict(nodes.NODE_CLASS_MAPPINGS)
    with contextlib.suppress(Exception):  # ModelSamplingDiscrete & co (v-prediction)
        from comfy_extras import nodes_model_advanced

        classes |= getattr(nodes_model_advanced, "NODE_CLASS_MAPPINGS", {})
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
        done[key] = getattr(cls(), cls.FUNCTION)(**inputs)
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
    """{checkpoint name: (ComfyUI's weight, the weight it samples with)} for every weight its LoRA loader patched:
    the patches applied by comfy.lora.calculate_weight, under the checkpoint's names (model.diffusion_model.*,
    cond_stage_model.transformer.*). Call it before sampling: ComfyUI patches its weights in place to sample."""
    import comfy.lora
    import comfy.utils

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for patcher, prefix, strip in (
        (model, "model.diffusion_model.", "diffusion_model."),
        (clip.patcher if clip is not None else None, "cond_stage_model.transformer.", "clip_l.transformer."),
    ):
        if patcher is None:
            continue
        for key, patches in patcher.patches.items():
            weight = comfy.utils.get_attr(patcher.model, key).detach().float()
            merged = comfy.lora.calculate_weight(patches, weight.clone(), key)
            out[prefix + key.removeprefix(strip)] = (weight, merged)
    return out

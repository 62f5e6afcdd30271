"""ComfyUI's side of bench/parity.py for the real-width, reduced-depth cases (`real-*`: bench/_models.py's
pipelines at the published widths, fewer blocks): the files the run's workflow loads, and the least ComfyUI needs
to read them. At the real widths ComfyUI detects the published model class, latent format and autoencoder from the
files itself; what it still gets here is only what the reduced depth and the offline vocabularies make different:

- SD 1.5 (`real-sd15`, every layer): nothing. CheckpointLoaderSimple reads the checkpoint as a published one.
- FLUX.1 [dev] (`real-flux`): ComfyUI's own T5-XXL config at the pipeline's T5 depth (FLUX_DEPTH, 2 of 24 layers),
  and ComfyUI's T5XXLTokenizer with the pipeline's offline T5 vocabulary (sdlora.families.offline_text, ids within
  T5's) instead of the real sentencepiece one. The transformer (1 double + 2 single blocks), CLIP-L (all 12 layers,
  the real BPE vocabulary) and the AE are detected and read by ComfyUI alone.
- Z-Image and FLUX.2 [klein] (`real-zimage`, `real-klein`; the fork): Qwen3-4B's config at the pipeline's depth
  (Z-Image 2 of 36 layers; klein 27 narrow layers, QWEN3_NARROW) and the offline byte-level Qwen vocabulary and pad
  id (parity_zimage.text_encoder); Z-Image's refiner depth (the fork builds the published 2 per side whatever the
  file holds; the reduced model has 1). The transformer's widths and class and the AE: ComfyUI's own detection.

On leaving each context, ComfyUI's loaded models are unloaded (the real-width copies are GBs).
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# (latent channels, downsampling) of the latent each KSampler noises, per real case's family
LATENT = {"flux": (16, 8), "zimage": (16, 8), "klein": (128, 16), "sd1": (4, 8), "qwenimage": (16, 8)}


class OfflineT5Tokenizer:
    """transformers' tokenizer class as ComfyUI's SDTokenizer asks for it: the pipeline's offline T5 vocabulary."""

    @staticmethod
    def from_pretrained(path: Any, **kwargs: Any) -> Any:
        from sdlora.families.offline_text import t5_tokenizer

        return t5_tokenizer()


@contextlib.contextmanager
def unloaded_after() -> Iterator[None]:
    try:
        yield
    finally:
        import comfy.model_management

        comfy.model_management.unload_all_models()
        gc.collect()


@contextlib.contextmanager
def flux_loading(folder: Path, workdir: Path) -> Iterator[None]:
    """ComfyUI's T5-XXL at the pipeline's depth, its T5 tokenizer with the offline vocabulary."""
    import comfy.sd1_clip
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.sd3_clip as sd3_clip
    import comfy.text_encoders.t5
    import parity_zimage

    layers = json.loads((folder / "text_encoder_2/config.json").read_text())["num_layers"]
    config = json.loads((Path(sd3_clip.__file__).parent / "t5_config_xxl.json").read_text())
    t5_config = workdir / "t5_config_reduced.json"
    t5_config.write_text(json.dumps(config | {"num_layers": layers, "num_decoder_layers": layers}))

    class T5(sd3_clip.T5XXLModel):  # ComfyUI's T5XXLModel, the config's depth changed
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=False,
                     model_options={}):  # noqa: B006 (ComfyUI's signature)  # fmt: skip
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=str(t5_config),
                dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options={**model_options, "model_name": "t5xxl"},
            )  # fmt: skip

    class Tokenizer(flux.T5XXLTokenizer):  # ComfyUI's, the vocabulary swapped
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's signature)
            comfy.sd1_clip.SDTokenizer.__init__(
                self, "offline-t5", embedding_directory=embedding_directory, pad_with_end=False,
                embedding_size=4096, embedding_key="t5xxl", tokenizer_class=OfflineT5Tokenizer, has_start_token=False,
                pad_to_max_length=False, max_length=99999999, min_length=256, tokenizer_data=tokenizer_data,
            )  # fmt: skip

    with unloaded_after(), parity_zimage.patched((sd3_clip, "T5XXLModel", T5), (flux, "T5XXLTokenizer", Tokenizer)):
        yield


@contextlib.contextmanager
def fork_loading(family: str, folder: Path) -> Iterator[None]:
    """The fork's Qwen3 at the pipeline's depth and vocabulary (parity_zimage.text_encoder); nothing else."""
    import parity_zimage

    # node classes and folder_paths: parity_fork.import_fork installed the fork's as `nodes` and `folder_paths`
    changes = parity_zimage.text_encoder(family, parity_zimage.qwen_config(folder))
    if family == "zimage":
        changes += refiner_depth()
    with unloaded_after(), parity_zimage.patched(*changes):
        yield


def refiner_depth() -> list[tuple[Any, str, Any]]:
    """Z-Image's refiner depth counted from the file (the fork counts the main layers but builds 2 refiner layers
    each side, the published count; the reduced model has ZIMAGE_DEPTH's 1)."""
    import comfy.model_detection as detection

    detect = detection.detect_unet_config

    def counted(state_dict: Any, key_prefix: str, *args: Any, **kwargs: Any) -> Any:
        config = detect(state_dict, key_prefix, *args, **kwargs)
        if config and config.get("image_model") == "lumina2":
            config["n_refiner_layers"] = detection.count_blocks(list(state_dict), f"{key_prefix}noise_refiner.{{}}.")
        return config

    return [(detection, "detect_unet_config", counted)]


def comfy_files(family: str, base: Path, workflow: dict[str, Any], root: Path) -> tuple[dict[str, Path], Any, Path]:
    """As parity.comfy_files: ({ComfyUI folder kind: folder}, the loading context, the model file)."""
    loaders = {n["class_type"]: n["inputs"] for n in workflow.values()}
    if family == "flux":
        import parity_flux
        from safetensors.torch import load_file

        name = loaders["UNETLoader"]["unet_name"]
        folders = parity_flux.write_files(base, name, root)
        clip = load_file(str(folders["text_encoders"] / parity_flux.CLIP_L))
        both = parity_flux.with_clip_l(folders["diffusion_models"] / name, clip, root / "base-and-clip.st")
        return folders, flux_loading(base, root), both
    if family in ("zimage", "klein"):
        import parity_zimage

        folders = parity_zimage.write_files(family, base, workflow, root)
        unet = folders["diffusion_models"] / loaders["UNETLoader"]["unet_name"]
        return folders, fork_loading(family, base), unet
    from sdlora import testing

    ckpt = testing.write_single_file(base, root / "checkpoints" / loaders["CheckpointLoaderSimple"]["ckpt_name"])
    return {"checkpoints": ckpt.parent}, unloaded_after(), ckpt

"""ComfyUI's side of bench/parity.py for FLUX.1: the tiny Flux pipeline's files in ComfyUI's folders, and what
ComfyUI's loaders need to read them (the counterpart of parity_comfy.tiny_loading for SD).

The workflow sdlora writes for Flux loads three files (UNETLoader: BFL's transformer file; DualCLIPLoader type
flux: clip_l.safetensors and t5xxl_fp16.safetensors; VAELoader: ae.safetensors). `write_files` writes them from a
diffusers folder: the transformer by the family's own single-file writer (BFL names), CLIP-L and T5 as
transformers state dicts (what ComfyUI's text encoder files hold), the AE under LDM names. `tiny_loading` then
hands ComfyUI, for these tiny files:
- ComfyUI's Flux model class over the DiT config ComfyUI itself detects from the file, with the tiny widths it
  assumes for the published model (hidden size, heads, text width, RoPE axes, 4 latent channels);
- the latent format's channels, scale and shift of the tiny AE, and EmptySD3LatentImage with 4 channels;
- ComfyUI's FluxClipModel / FluxTokenizer with the tiny CLIP-L and T5 configs and the tiny T5 vocabulary;
- the AE's channels and group count (parity_comfy's VAE shim), without quant convolutions as Flux's AE has none.
Key mapping, LoRA patching, text encoding, the model, ModelSamplingFlux, FluxGuidance, KSampler and decoding are
ComfyUI's own.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CLIP_L = "clip_l.safetensors"
T5 = "t5xxl_fp16.safetensors"
AE = "ae.safetensors"


def write_files(folder: Path, unet_name: str, root: Path) -> dict[str, Path]:
    """The tiny Flux pipeline in `folder` as ComfyUI's folders under `root`: {ComfyUI folder kind: folder}."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    from sdlora import families
    from sdlora.families.sd import single_file

    pipe = FluxPipeline.from_pretrained(str(folder))
    kinds = {k: root / k for k in ("diffusion_models", "text_encoders", "vae")}
    for path in kinds.values():
        path.mkdir(parents=True, exist_ok=True)
    families.get("flux").save_single_file(pipe, kinds["diffusion_models"] / unet_name)
    save_file(clip_state(pipe), kinds["text_encoders"] / CLIP_L)
    t5 = {k: v.contiguous() for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, kinds["text_encoders"] / T5)
    vae = {k.removeprefix(single_file.VAE_PREFIX): v.contiguous() for k, v in single_file.vae_state(pipe.vae).items()}
    save_file(vae, kinds["vae"] / AE)
    return kinds


def clip_state(pipe: Any) -> dict[str, torch.Tensor]:
    """CLIP-L's tensors as the published clip_l.safetensors names them (transformers 5 leaves out `text_model.`)."""
    state = pipe.text_encoder.state_dict()
    return {"text_model." + k.removeprefix("text_model."): v.contiguous() for k, v in state.items()}


def with_clip_l(model_file: Path, clip: dict[str, torch.Tensor], path: Path) -> Path:
    """The transformer file plus CLIP-L under ComfyUI's names (`clip_l.transformer.text_model.*`), in one file at
    `path`: what parity.weight_diffs compares (ComfyUI's patched CLIP-L beside the model)."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(model_file)) | {"clip_l.transformer." + k: v for k, v in clip.items()}, path)
    return path


class TinyT5Tokenizer:
    """transformers' tokenizer class as ComfyUI's SDTokenizer asks for it: from_pretrained gives the tiny T5
    vocabulary of the tiny pipeline (sdlora.testing.t5_tokenizer)."""

    @staticmethod
    def from_pretrained(path: Any, **kwargs: Any) -> Any:
        from sdlora.testing import t5_tokenizer

        return t5_tokenizer()


@contextlib.contextmanager
def tiny_loading(folder: Path, workdir: Path) -> Iterator[None]:
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5
    import parity_comfy
    from comfy_extras import nodes_sd3

    transformer = json.loads((folder / "transformer/config.json").read_text())
    vae = json.loads((folder / "vae/config.json").read_text())
    clip_config = workdir / "clip_l_config.json"
    clip_config.write_text((folder / "text_encoder/config.json").read_text())
    t5 = json.loads((folder / "text_encoder_2/config.json").read_text())
    t5_config = workdir / "t5_config.json"
    t5 |= {"dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5"}  # HF's "gated-gelu"
    t5_config.write_text(json.dumps(t5))
    channels = vae["latent_channels"]

    def detect(state_dict, prefix, *args, **kwargs):
        dit = comfy.model_detection.detect_unet_config(state_dict, prefix)
        dit |= {
            "in_channels": channels, "out_channels": channels,
            "hidden_size": transformer["num_attention_heads"] * transformer["attention_head_dim"],
            "num_heads": transformer["num_attention_heads"], "axes_dim": list(transformer["axes_dims_rope"]),
            "context_in_dim": transformer["joint_attention_dim"],
        }  # fmt: skip
        config = (comfy.supported_models.Flux if dit["guidance_embed"] else comfy.supported_models.FluxSchnell)(dit)
        latent = comfy.latent_formats.Flux()
        latent.latent_channels = channels
        latent.scale_factor, latent.shift_factor = vae["scaling_factor"], vae["shift_factor"]
        config.latent_format = latent
        return config

    class Tokenizer(comfy.text_encoders.flux.FluxTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's signature)
            self.clip_l = comfy.sd1_clip.SDTokenizer(embedding_directory=embedding_directory)
            self.t5xxl = comfy.sd1_clip.SDTokenizer(
                "tiny-t5",
                embedding_directory=embedding_directory,
                pad_with_end=False,
                embedding_size=t5["d_model"],
                embedding_key="t5xxl",
                tokenizer_class=TinyT5Tokenizer,
                has_start_token=False,
                pad_to_max_length=False,
                max_length=99999999,
                min_length=256,
            )  # fmt: skip  (ComfyUI's T5XXLTokenizer, the vocabulary swapped)

    class Clip(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, return_projected_pooled=False, model_options=model_options,
                textmodel_json_config=str(clip_config),
            )  # fmt: skip
            self.t5xxl = comfy.sd1_clip.SDClipModel(
                device=device,
                layer="last",
                dtype=dtype,
                textmodel_json_config=str(t5_config),
                special_tokens={"end": 1, "pad": 0},
                model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=False,
                return_attention_masks=False,
                model_options={**model_options, "model_name": "t5xxl"},
            )  # fmt: skip  (ComfyUI's T5XXLModel, the config swapped)
            self.dtypes = {dtype}

    def vae_init(self, sd=None, *args, **kwargs):
        original_vae(self, sd, *args, **kwargs)
        if sd is not None and not any(k.startswith("quant_conv.") for k in sd):  # Flux's AE has none
            self.first_stage_model.quant_conv = torch.nn.Identity()
            self.first_stage_model.post_quant_conv = torch.nn.Identity()

    def empty_latent(cls, width, height, batch_size=1):
        from comfy_api.latest import io

        return io.NodeOutput({"samples": torch.zeros([batch_size, channels, height // 8, width // 8])})

    saved = (
        comfy.model_detection.model_config_from_unet,
        comfy.text_encoders.flux.flux_clip,
        comfy.text_encoders.flux.FluxTokenizer,
        nodes_sd3.EmptySD3LatentImage.__dict__["execute"],
    )
    with parity_comfy.vae_loading(folder):
        original_vae = comfy.sd.VAE.__init__
        comfy.sd.VAE.__init__ = vae_init
        comfy.model_detection.model_config_from_unet = detect
        comfy.text_encoders.flux.flux_clip = lambda **kw: Clip
        comfy.text_encoders.flux.FluxTokenizer = Tokenizer
        nodes_sd3.EmptySD3LatentImage.execute = classmethod(empty_latent)
        try:
            yield
        finally:
            comfy.sd.VAE.__init__ = original_vae
            (
                comfy.model_detection.model_config_from_unet,
                comfy.text_encoders.flux.flux_clip,
                comfy.text_encoders.flux.FluxTokenizer,
                latent_execute,
            ) = saved
            nodes_sd3.EmptySD3LatentImage.execute = latent_execute

"""ComfyUI's side of bench/parity.py for Z-Image and FLUX.2 [klein]: the pip-installable fork of ComfyUI
(hiddenswitch/pip-and-uv-installable-ComfyUI; upstream's snapshot here predates both), the tiny pipelines' files in
its folders, and what its loaders need to read them (the counterpart of parity_flux for FLUX.1).

The workflow sdlora writes for these families loads three files (UNETLoader: the transformer under its original
names, by the family's own single-file writer; CLIPLoader type lumina2 / flux2: the Qwen3 text encoder as a
transformers state dict under `model.`; VAELoader: the AE under LDM names). `tiny_loading` hands the fork, for them:
- its model class (Z-Image: supported_models.ZImage over Lumina 2's NextDiT; klein: Flux2) over the DiT config it
  detects from the file, with the tiny widths it assumes for the published models (heads, RoPE axes and theta,
  channels; Z-Image's feed-forward rounding and timestep MLP, klein's timestep channels);
- its Qwen3 text encoders (ComfyUI's own Llama2_ code, the layers each family reads) over the tiny Qwen3 config,
  and its tokenizer classes (templates, padding) with the tiny byte-level Qwen vocabulary and its pad id in place of
  Qwen's (sdlora.families.offline_text.qwen_tokenizer: the tiny pipelines' ids are not the real ones);
- the AE's channels and group count, and the empty-latent nodes at the tiny AE's latent channels.
Key mapping, LoRA patching, text encoding, the model, ModelSamplingAuraFlow, Flux2Scheduler, the samplers and
decoding are the fork's own, imported by parity_fork.import_fork (its docstring has the one setup: the fork's export
and the command).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("zimage", "klein")
LATENT = {"zimage": (4, 8), "klein": (16, 16)}  # (channels, downsampling) of the latent each KSampler noises


def write_files(family: str, folder: Path, workflow: dict[str, Any], root: Path) -> dict[str, Path]:
    """The tiny pipeline in diffusers `folder` as the files the workflow's loaders name, under `root`'s ComfyUI
    folders: {folder kind: folder}."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from sdlora import families
    from sdlora.families.sd import single_file

    loaders = {n["class_type"]: n["inputs"] for n in workflow.values()}
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    kinds = {k: root / k for k in ("diffusion_models", "text_encoders", "vae")}
    for path in kinds.values():
        path.mkdir(parents=True, exist_ok=True)
    families.get(family).save_single_file(pipe, kinds["diffusion_models"] / loaders["UNETLoader"]["unet_name"])
    # Comfy-Org's qwen_3_4b.safetensors: Qwen3's decoder under `model.` (no lm_head; klein's is tied anyway)
    text = {
        "model." + k.removeprefix("model."): v.contiguous()
        for k, v in pipe.text_encoder.state_dict().items()
        if not k.startswith("lm_head.")
    }
    save_file(text, kinds["text_encoders"] / loaders["CLIPLoader"]["clip_name"])
    vae = {k.removeprefix(single_file.VAE_PREFIX): v.contiguous() for k, v in single_file.vae_state(pipe.vae).items()}
    if "bn.running_mean" in vae and "post_quant_conv.weight" not in vae:
        # The tiny FLUX.2 AE has no quant convolutions; FLUX.2's has them, and ComfyUI undoes the batch-norm latent
        # normalisation only in the AE class it builds for a file with them: identity 1x1 convolutions change nothing
        z = pipe.vae.config.latent_channels
        for name, width in (("quant_conv", 2 * z), ("post_quant_conv", z)):
            vae[f"{name}.weight"], vae[f"{name}.bias"] = torch.eye(width)[:, :, None, None], torch.zeros(width)
    save_file(vae, kinds["vae"] / loaders["VAELoader"]["vae_name"])
    return kinds


class TinyQwenTokenizer:
    """transformers' tokenizer class as ComfyUI's SDTokenizer asks for it: from_pretrained gives the tiny
    byte-level Qwen vocabulary of the tiny pipelines."""

    @staticmethod
    def from_pretrained(path: Any, **kwargs: Any) -> Any:
        from sdlora.families.offline_text import qwen_tokenizer

        return qwen_tokenizer()


def qwen_config(folder: Path) -> dict[str, Any]:
    """The tiny text encoder's Qwen3 sizes, as ComfyUI's Qwen3 config names them."""
    config = json.loads((folder / "text_encoder/config.json").read_text())
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    sizes += ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps")
    out = {k: config[k] for k in sizes}
    out["rope_theta"] = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 1e6))
    return out | {"pad": config["pad_token_id"]}


@contextlib.contextmanager
def patched(*changes: tuple[Any, str, Any]) -> Iterator[None]:
    """setattr(owner, name, value) for each change while open; the old values back after."""
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in changes]
    try:
        for owner, name, value in changes:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def text_encoder(family: str, qwen: dict[str, Any]) -> list[tuple[Any, str, Any]]:
    """The fork's Qwen3 text encoder and tokenizer of `family` over the tiny config and vocabulary: ComfyUI's own
    classes (template, the layers read, padding), the model config, the vocabulary and the pad id swapped."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.z_image as z_image

    class TinyQwen3(llama.BaseLlama, llama.BaseQwen3, torch.nn.Module):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen3_4BConfig()
            for key, value in qwen.items():
                setattr(config, key, value)  # head_dim is no dataclass field: not a constructor argument
            # SDClipModel asserts |layer_idx| < num_layers: Z-Image's -2 of a 2-layer encoder is its layer 0's output
            self.num_layers = config.num_hidden_layers + 1
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    def with_pad(model_class: Any) -> Any:  # the pad id that ends a prompt's attention mask
        class Model(model_class):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.special_tokens = {"pad": qwen["pad"]}

        return Model

    def tokenizer(min_length: int) -> Any:  # z_image's / flux's Qwen3Tokenizer, the vocabulary swapped
        return functools.partial(
            comfy.sd1_clip.SDTokenizer, "tiny-qwen", pad_with_end=False, embedding_size=qwen["hidden_size"],
            embedding_key="qwen3_4b", tokenizer_class=TinyQwenTokenizer, has_start_token=False,
            has_end_token=False, pad_to_max_length=False, max_length=99999999, min_length=min_length,
            pad_token=qwen["pad"],
        )  # fmt: skip

    def zimage_te(**detected: Any) -> Any:
        class Model(z_image.ZImageTEModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
                comfy.sd1_clip.SD1ClipModel.__init__(
                    self, device=device, dtype=dtype, name="qwen3_4b", clip_model=with_pad(z_image.Qwen3_4BModel),
                    model_options=model_options,
                )  # fmt: skip

        return Model

    def klein_te(**detected: Any) -> Any:
        class Model(flux.Flux2TEModel):
            def __init__(self, device="cpu", dtype=None, model_options=None):
                super().__init__(device, dtype, model_options or {}, "qwen3_4b", with_pad(flux.Qwen3_4BModel))

        return Model

    detect, qwen3 = comfy.sd.detect_te_model, comfy.sd.TEModel.QWEN3_4B  # ComfyUI tells Qwen3-4B by its width
    changes = [
        (llama, "Qwen3_4B", TinyQwen3),  # z_image's Qwen3_4BModel builds llama.Qwen3_4B
        (flux, "Qwen3_4B", TinyQwen3),  # flux's imports it by name
        (comfy.sd, "detect_te_model", lambda sd: qwen3 if "model.norm.weight" in sd else detect(sd)),
    ]
    if family == "zimage":
        return changes + [(z_image, "Qwen3Tokenizer", tokenizer(1)), (z_image, "te", zimage_te)]
    return changes + [(flux, "Qwen3Tokenizer", tokenizer(512)), (flux, "klein_te", klein_te)]


def denoiser(family: str, folder: Path) -> list[tuple[Any, str, Any]]:
    """The fork's model class over the DiT config it detects, with the tiny transformer's widths."""
    import comfy.latent_formats
    import comfy.ldm.flux.model as flux_model
    import comfy.ldm.lumina.model as lumina
    import comfy.model_detection
    import comfy.supported_models

    transformer = json.loads((folder / "transformer/config.json").read_text())
    vae = json.loads((folder / "vae/config.json").read_text())

    def detect(state_dict, prefix, *args, **kwargs):
        dit = comfy.model_detection.detect_unet_config(state_dict, prefix)
        if family == "zimage":
            dit |= {
                "in_channels": transformer["in_channels"], "patch_size": transformer["all_patch_size"][0],
                "n_refiner_layers": transformer["n_refiner_layers"],
                "n_heads": transformer["n_heads"], "n_kv_heads": transformer["n_kv_heads"],
                "axes_dims": list(transformer["axes_dims"]), "axes_lens": list(transformer["axes_lens"]),
                "rope_theta": transformer.get("rope_theta", 256.0), "ffn_dim_multiplier": 8.0 / 3.0,
                "multiple_of": 1,  # diffusers' int(dim / 3 * 8); ComfyUI rounds up to 256 (10240 at 3840 wide)
                "z_image_modulation": True, "time_scale": transformer.get("t_scale", 1000.0),
                "pad_tokens_multiple": 32, "norm_eps": transformer.get("norm_eps", 1e-5),
            }  # fmt: skip
            config = comfy.supported_models.ZImage(dit)
            latent = comfy.latent_formats.Flux()
            latent.scale_factor, latent.shift_factor = vae["scaling_factor"], vae["shift_factor"]
        else:
            dit |= {
                "num_heads": transformer["num_attention_heads"], "axes_dim": list(transformer["axes_dims_rope"]),
                "theta": transformer.get("rope_theta", 2000), "mlp_ratio": transformer.get("mlp_ratio", 3.0),
                "out_channels": transformer["in_channels"],
            }  # fmt: skip
            config = comfy.supported_models.Flux2(dit)
            latent = comfy.latent_formats.Flux2()
        latent.latent_channels = LATENT[family][0]
        config.latent_format = latent
        return config

    changes: list[tuple[Any, str, Any]] = [(comfy.model_detection, "model_config_from_unet", detect)]
    if family == "zimage":  # the timestep MLP: diffusers 256 -> 1024 -> min(dim, 256), ComfyUI 256 -> min(dim, 1024)
        embedder, width = lumina.TimestepEmbedder, min(transformer["dim"], 256)  # -> 256: the same at 3840 wide

        def timestep_mlp(hidden_size: int, output_size: int | None = None, **kwargs: Any) -> Any:
            return embedder(1024, output_size=width, **kwargs)

        return changes + [(lumina, "TimestepEmbedder", timestep_mlp)]
    # FLUX.2's timestep embedding: 256 sinusoid channels in ComfyUI, timestep_guidance_channels (32) in diffusers
    steps = transformer.get("timestep_guidance_channels", 256)
    embedding, mlp = flux_model.timestep_embedding, flux_model.MLPEmbedder

    def sinusoids(t: Any, dim: int, *args: Any, **kwargs: Any) -> Any:
        return embedding(t, steps if dim == 256 else dim, *args, **kwargs)

    def embedder_mlp(in_dim: int, *args: Any, **kwargs: Any) -> Any:
        return mlp(steps if in_dim == 256 else in_dim, *args, **kwargs)

    return changes + [(flux_model, "timestep_embedding", sinusoids), (flux_model, "MLPEmbedder", embedder_mlp)]


def autoencoder(folder: Path) -> list[tuple[Any, str, Any]]:
    """The AE's encoder and decoder at the tiny AE's channels, depth and GroupNorm groups (ComfyUI builds FLUX.1's
    and FLUX.2's AE with fixed ones; it reads the rest, FLUX.2's batch-norm statistics included, from the file)."""
    import comfy.ldm.modules.diffusionmodules.model as ae
    import parity_comfy

    vae = json.loads((folder / "vae/config.json").read_text())
    widths = list(vae["block_out_channels"])
    sizes = {"ch": widths[0], "ch_mult": [w // widths[0] for w in widths], "num_res_blocks": vae["layers_per_block"]}

    def tiny(init: Any) -> Any:
        def build(self, *args: Any, **kwargs: Any) -> None:
            with parity_comfy.group_norms(vae.get("norm_num_groups", 32)):
                init(self, *args, **(kwargs | sizes))

        return build

    return [(ae.Encoder, "__init__", tiny(ae.Encoder.__init__)), (ae.Decoder, "__init__", tiny(ae.Decoder.__init__))]


def empty_latent(family: str) -> list[tuple[Any, str, Any]]:
    """EmptySD3LatentImage (Z-Image) / EmptyFlux2LatentImage (klein) at the tiny AE's latent channels."""
    from comfy_api.latest import io
    from comfy_extras.nodes import nodes_flux, nodes_sd3

    channels, factor = LATENT[family]

    def execute(cls, width, height, batch_size=1):
        return io.NodeOutput({"samples": torch.zeros([batch_size, channels, height // factor, width // factor])})

    node = nodes_sd3.EmptySD3LatentImage if family == "zimage" else nodes_flux.EmptyFlux2LatentImage
    return [(node, "execute", classmethod(execute))]


@contextlib.contextmanager
def tiny_loading(family: str, folder: Path) -> Iterator[None]:
    """While open, the fork (parity_fork.import_fork) loads the tiny pipeline's files (write_files)."""
    changes = text_encoder(family, qwen_config(folder)) + denoiser(family, folder) + autoencoder(folder)
    with patched(*changes, *empty_latent(family)):
        yield

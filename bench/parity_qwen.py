"""ComfyUI's side of bench/parity.py for Qwen-Image: the tiny Qwen-Image pipeline's files in ComfyUI's folders, and
what the pip-installable fork's loaders need to read them (the counterpart of parity_flux for FLUX.1).

Upstream ComfyUI's snapshot here predates Qwen-Image; the fork hiddenswitch/pip-and-uv-installable-ComfyUI has it
(`comfy` as a package: model_base.QwenImage, text_encoders.qwen_image, the Wan 2.1 VAE that Qwen-Image's is),
imported by parity_fork.import_fork (its docstring has the one setup: the fork's export and the command).

The workflow sdlora writes for Qwen-Image loads three files (UNETLoader: the transformer under its diffusers names,
which are ComfyUI's; CLIPLoader type qwen_image: qwen_2.5_vl_7b.safetensors; VAELoader: qwen_image_vae.safetensors).
`write_files` writes them from a diffusers folder: the transformer by the family's own single-file writer,
Qwen2.5-VL's language model under the names of Comfy-Org's file (model.layers..., no vision tower: text-to-image
never runs it), the VAE under the Wan 2.1 names ComfyUI reads (`wan_name`). `tiny_loading` then hands the fork,
for these tiny files:
- its Qwen-Image model class over the DiT config it detects from the file, with the tiny widths it assumes for
  the published model (heads, head width, text width, RoPE axes, output channels);
- the Wan 2.1 latent format with the tiny VAE's 4 channels and its latents_mean / latents_std;
- its Qwen2.5-VL text encoder (llama.Qwen25_7BVLI, Llama2_) over the tiny config (head width and RoPE sections are
  class attributes there, so a subclass sets them), recognised as Qwen2.5-VL-7B (detect_te_model tells it by the
  7B's key width), behind the tiny byte-level Qwen tokenizer with its pad id;
- the template's end at the family's drop (34; the Edit template's 64), where ComfyUI's own search (the second
  <|im_start|>, then "user\\n") ends it with the real Qwen tokenizer (`template_end_real`, checked each run); the
  tiny tokenizer spells the template one byte a token, so the search finds no real id there;
- the Wan 2.1 VAE at the tiny channels (base 8, one residual block per level, multipliers 1, 4 latent channels).
Key mapping, LoRA patching, text encoding (CLIPTextEncode; TextEncodeQwenImageEditPlus for the Edit model), the
model, ModelSamplingAuraFlow, KSampler and decoding are the fork's. `explain` takes sdlora's render apart against
ComfyUI's, in images and in the latents each decodes; `with_clip_text_encode` renders an Edit workflow as it was
written before TextEncodeQwenImageEditPlus.
"""

from __future__ import annotations

import contextlib
import functools
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

TEXT_ENCODER = "qwen_2.5_vl_7b.safetensors"
VAE = "qwen_image_vae.safetensors"
LATENTS = "comfyui-latents.pt"  # what ComfyUI's VAEDecode nodes decoded, in workflow order
RESNET = {"norm1.gamma": "residual.0.gamma", "conv1.": "residual.2.", "norm2.gamma": "residual.3.gamma"}
RESNET |= {"conv2.": "residual.6.", "conv_shortcut.": "shortcut."}


def language_state(encoder: Any) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL's language model under Comfy-Org's names (model.embed_tokens, model.layers.N..., model.norm):
    transformers 5 holds it under model.language_model."""
    state = encoder.state_dict()
    prefix = "model.language_model."
    return {"model." + k.removeprefix(prefix): v.contiguous() for k, v in state.items() if k.startswith(prefix)}


def wan_name(key: str, blocks: int) -> str:
    """One diffusers AutoencoderKLQwenImage key under the Wan 2.1 VAE's original names (what ComfyUI builds), for
    `blocks` residual blocks per level (diffusers' own converter assumes Wan's 2; each decoder level holds blocks + 1
    residual blocks and, but for the last, one upsampler)."""
    for side in ("encoder.", "decoder."):
        if not key.startswith(side):
            continue
        rest = key.removeprefix(side)
        fixed = {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2."}
        fixed |= {"mid_block.resnets.0.": "middle.0.", "mid_block.attentions.0.": "middle.1."}
        fixed |= {"mid_block.resnets.1.": "middle.2."}
        for old, new in fixed.items():
            if rest.startswith(old):
                return (
                    side + resnet(new + rest.removeprefix(old)) if "resnets" in old else side + new + rest[len(old) :]
                )
        if rest.startswith("down_blocks."):
            return side + resnet("downsamples." + rest.removeprefix("down_blocks."))
        if rest.startswith("up_blocks."):
            _, level, kind, index, tail = rest.split(".", 4)
            flat = int(level) * (blocks + 2) + (int(index) if kind == "resnets" else blocks + 1)
            return side + resnet(f"upsamples.{flat}.{tail}")
        raise KeyError(key)
    for old, new in (("post_quant_conv.", "conv2."), ("quant_conv.", "conv1.")):
        if key.startswith(old):
            return new + key.removeprefix(old)
    raise KeyError(key)


def resnet(key: str) -> str:
    """A residual block's diffusers layer names (norm1, conv1, ...) -> Wan's (residual.0, residual.2, ...)."""
    head, _, tail = key.partition(".")
    index, _, layer = tail.partition(".")
    for old, new in RESNET.items():
        if layer.startswith(old):
            return f"{head}.{index}.{new}{layer.removeprefix(old)}"
    return key


def write_files(folder: Path, unet_name: str, root: Path) -> dict[str, Path]:
    """The tiny Qwen-Image pipeline in `folder` as ComfyUI's folders under `root`: {ComfyUI folder kind: folder}."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from sdlora import families

    pipe = DiffusionPipeline.from_pretrained(str(folder), **families.stand_ins(str(folder), {}))
    kinds = {k: root / k for k in ("diffusion_models", "text_encoders", "vae")}
    for path in kinds.values():
        path.mkdir(parents=True, exist_ok=True)
    families.detect(pipe).save_single_file(pipe, kinds["diffusion_models"] / unet_name)
    save_file(language_state(pipe.text_encoder), kinds["text_encoders"] / TEXT_ENCODER)
    blocks = pipe.vae.config.num_res_blocks
    vae = {wan_name(k, blocks): v.contiguous() for k, v in pipe.vae.state_dict().items()}
    save_file(vae, kinds["vae"] / VAE)
    return kinds


def template_end_real(template: str) -> int:
    """Where ComfyUI's QwenImageTEModel cuts the template (the second <|im_start|> 151644, past "user" 872 and "\\n"
    198) in the real Qwen2.5 tokenizer's ids, the one the fork ships."""
    from comfy.component_model import files
    from transformers import Qwen2Tokenizer

    path = files.get_package_as_path("comfy.text_encoders.qwen25_tokenizer")
    ids = Qwen2Tokenizer.from_pretrained(str(path))(template.format("a photo of sks person"))["input_ids"]
    end = [i for i, token in enumerate(ids) if token == 151644][1]
    return end + 3 if ids[end + 1 : end + 3] == [872, 198] else end


class TinyQwenTokenizer:
    """transformers' tokenizer class as ComfyUI's SDTokenizer asks for it: from_pretrained gives the tiny byte-level
    Qwen tokenizer of the tiny pipeline."""

    @staticmethod
    def from_pretrained(path: Any, **kwargs: Any) -> Any:
        from sdlora.families.offline_text import qwen_tokenizer

        return qwen_tokenizer()


@contextlib.contextmanager
def tiny_loading(folder: Path, drop: int, latents: Path) -> Iterator[None]:
    """While open, the fork's UNETLoader, CLIPLoader (qwen_image) and VAELoader read the tiny files `write_files`
    wrote for the pipeline in `folder`; the text encoder's template ends at `drop` (the family's). The latents each
    VAEDecode decodes (the sampler's result, denormalised) are saved to `latents` when it closes."""
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.wan import vae as wan_vae
    from comfy.text_encoders import llama, qwen_image

    from sdlora.families.offline_text import qwen_tokenizer

    transformer = json.loads((folder / "transformer/config.json").read_text())
    vae = json.loads((folder / "vae/config.json").read_text())
    text = json.loads((folder / "text_encoder/config.json").read_text())
    text = text.get("text_config", text)
    pad, channels = qwen_tokenizer().pad_token_id, vae["z_dim"]

    def detect(state_dict, prefix, *args, **kwargs):
        dit = comfy.model_detection.detect_unet_config(state_dict, prefix)
        if dit.get("image_model") != "qwen_image":
            return original["detect"](state_dict, prefix, *args, **kwargs)
        config = comfy.supported_models.QwenImage(dit)
        config.unet_config |= {
            k: transformer[k] for k in ("out_channels", "attention_head_dim", "num_attention_heads")
        } | {"joint_attention_dim": transformer["joint_attention_dim"], "axes_dims_rope": transformer["axes_dims_rope"]}
        latent = comfy.latent_formats.Wan21()
        latent.latent_channels = channels
        latent.latents_mean = torch.tensor(vae["latents_mean"]).view(1, channels, 1, 1, 1)
        latent.latents_std = torch.tensor(vae["latents_std"]).view(1, channels, 1, 1, 1)
        config.latent_format = latent
        return config

    class Qwen(llama.Qwen25_7BVLI):  # Qwen25_7BVLI with the tiny config, no vision tower (text-to-image)
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            config.head_dim = text["hidden_size"] // text["num_attention_heads"]
            config.rope_dims = list(rope["mrope_section"])
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    config_dict = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    config_dict |= {k: text[k] for k in ("num_attention_heads", "num_key_value_heads", "rms_norm_eps")}
    rope = text.get("rope_parameters") or text["rope_scaling"]  # transformers 5's name, 4's
    config_dict["rope_theta"] = rope.get("rope_theta", text.get("rope_theta"))

    class Encoder(qwen_image.Qwen25_7BVLIModel):  # ComfyUI's, with the model class and pad id swapped
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True, **kw):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=config_dict,
                dtype=dtype, special_tokens={"pad": pad}, layer_norm_hidden_state=False, model_class=Qwen,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options=kw.get("model_options") or {},
            )  # fmt: skip

    class TextEncoder(qwen_image.QwenImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            comfy.sd1_clip.SD1ClipModel.__init__(
                self,
                device=device,
                dtype=dtype,
                name="qwen25_7b",
                clip_model=Encoder,
                model_options=model_options or {},
            )

        def encode_token_weights(self, token_weight_pairs, template_end=-1):
            return super().encode_token_weights(
                token_weight_pairs, template_end=drop if template_end == -1 else template_end
            )

    def te(dtype_llama=None, llama_quantization_metadata=None):
        return functools.partial(_with_dtype, TextEncoder, dtype_llama)

    class Words(qwen_image.Qwen25_7BVLITokenizer):  # ComfyUI's, the vocabulary and pad id swapped
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            comfy.sd1_clip.SDTokenizer.__init__(
                self, "tiny-qwen", pad_with_end=False, embedding_directory=embedding_directory,
                embedding_size=text["hidden_size"], embedding_key="qwen25_7b", tokenizer_class=TinyQwenTokenizer,
                has_start_token=False, has_end_token=False, pad_to_max_length=False, max_length=99999999,
                min_length=1, pad_token=pad, tokenizer_data=tokenizer_data or {},
            )  # fmt: skip

    def wan(**ddconfig):  # the Wan 2.1 VAE at the tiny VAE's channels
        tiny = {"z_dim": channels, "dim_mult": vae["dim_mult"], "num_res_blocks": vae["num_res_blocks"]}
        return original["wan"](**ddconfig | tiny | {"temperal_downsample": vae["temperal_downsample"]})

    decoded: list[torch.Tensor] = []

    def decode(self, samples, *args, **kwargs):
        decoded.append(samples.detach().float().clone())
        return original["decode"](self, samples, *args, **kwargs)

    def vae_init(self, *args, **kwargs):
        original["vae_init"](self, *args, **kwargs)
        if isinstance(getattr(self, "first_stage_model", None), original["wan"]):
            self.latent_channels = channels

    def detect_te(sd):  # the tiny Qwen2.5-VL: q/k/v biases (Qwen2's) at the tiny width
        embed = sd.get("model.embed_tokens.weight")
        if embed is not None and embed.shape[1] == text["hidden_size"] and "model.layers.0.self_attn.k_proj.bias" in sd:
            return comfy.sd.TEModel.QWEN25_7B
        return original["detect_te"](sd)

    original = {
        "detect": comfy.model_detection.model_config_from_unet,
        "wan": wan_vae.WanVAE,
        "vae_init": comfy.sd.VAE.__init__,
        "decode": comfy.sd.VAE.decode,
        "detect_te": comfy.sd.detect_te_model,
    }
    patches = [(comfy.model_detection, "model_config_from_unet", detect), (wan_vae, "WanVAE", wan)]
    patches += [(comfy.sd.VAE, "__init__", vae_init), (comfy.sd.VAE, "decode", decode)]
    patches += [(comfy.sd, "detect_te_model", detect_te), (qwen_image, "te", te)]
    patches += [(qwen_image, "Qwen25_7BVLITokenizer", Words)]
    with contextlib.ExitStack() as stack:
        for target, name, new in patches:
            stack.enter_context(mock.patch.object(target, name, new))
        try:
            yield
        finally:
            torch.save(decoded, latents)


def _with_dtype(cls: type, dtype_llama: Any, device: str = "cpu", dtype: Any = None, model_options: Any = None) -> Any:
    """ComfyUI's qwen_image.te: the text encoder in the dtype of its file's weights where that is known."""
    return cls(device=device, dtype=dtype_llama or dtype, model_options=model_options)


def comfy_files(base: Path, workflow: dict[str, Any], root: Path, family: Any) -> tuple[dict[str, Path], Any, Path]:
    """parity.comfy_files for Qwen-Image and -Edit: the folders, the loading context, the transformer file. The
    template's end is the family's drop, checked to be where ComfyUI's search ends it with the real tokenizer."""
    drop = template_end_real(family.template)
    if drop != family.drop:
        raise SystemExit(f"{family.name}: ComfyUI cuts the template at {drop}, the pipeline at {family.drop}")
    name = next(n["inputs"]["unet_name"] for n in workflow.values() if n["class_type"] == "UNETLoader")
    folders = write_files(base, name, root)
    return folders, tiny_loading(base, drop, root / LATENTS), folders["diffusion_models"] / name


@contextlib.contextmanager
def without_cfg_renorm() -> Iterator[list[int]]:
    """While open, QwenImagePipeline leaves true CFG's result as it is: its rescaling to the conditional prediction's
    norm (cond_norm / noise_norm, both torch.norm, its only use of it) reads 1. Yields the count of norms taken."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage

    calls: list[int] = []

    class Torch(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    def norm(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return torch.ones_like(x[..., :1])

    proxy = Torch("torch")
    proxy.norm = norm
    pipeline_qwenimage.torch = proxy
    try:
        yield calls
    finally:
        pipeline_qwenimage.torch = torch


def explain(
    base: Path, lora: Path, items: list[tuple[str, int, str]], sampling: Any, theirs: list, others: dict | None = None
) -> dict[str, Any]:
    """sdlora's render (the LoRA as generate loads it) with what ComfyUI's workflow does not do taken out, step by
    step, each against ComfyUI's images (`theirs`, uint8 (H, W, 3)) and the latents ComfyUI decoded (LATENTS beside
    the base folder): as sdlora renders; the base alone; the sigmas not stretched to end at shift_terminal; and then
    also true CFG's result not rescaled to the conditional prediction's norm. `others`: {label: (images, latents)}
    of other ComfyUI renders, each compared with sdlora's render as it is and with both taken out. Latent
    differences are relative to the largest latent value: the tiny VAE's images change little with the latents, the
    latents show more."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdlora.generate.render import load_for_rendering, render_images
    from sdlora.lora.files import Lora
    from sdlora.settings import ModelConfig

    comfy = (theirs, torch.load(base.parent / LATENTS))
    pipe, _, _ = load_for_rendering(ModelConfig(base=str(base)), [Lora(lora, 1.0, "me")])
    prompts, seeds = [p for p, _, _ in items], [s for _, s, _ in items]
    decode = pipe.vae.decode
    seen: list[torch.Tensor] = []

    def recorded(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.extend(z.detach().float().split(1))
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recorded

    def render() -> tuple[list, list]:
        images = [np.asarray(i.convert("RGB")) for i in render_images(pipe, prompts, seeds, sampling)]
        latents = list(seen)
        seen.clear()
        return images, latents

    ours = render()
    out: dict[str, Any] = {
        "shift_terminal": pipe.scheduler.config.get("shift_terminal"),
        "as_rendered": diff(ours, comfy),
    }
    out |= {label: diff(ours, other) for label, other in (others or {}).items()}
    pipe.disable_lora()
    out["lora_effect_on_comfyui"] = diff(render(), comfy)  # the base alone against ComfyUI's render with the LoRA
    pipe.enable_lora()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**pipe.scheduler.config, "shift_terminal": None})
    out["without_shift_terminal"] = diff(render(), comfy)
    with without_cfg_renorm() as calls:
        plain = render()
    out["without_shift_terminal_and_cfg_renorm"] = diff(plain, comfy)
    out |= {f"{label}_vs_without_both": diff(plain, other) for label, other in (others or {}).items()}
    out["cfg_renorms_skipped"] = len(calls) // 2  # two norms per step and batch
    return out


def diff(ours: tuple[list, list], theirs: tuple[list, list]) -> dict[str, float]:
    """Two renders' (uint8 (H, W, 3) images, latents): the images' max / mean difference in [0, 1], the latents'
    largest difference over the largest latent value."""
    import numpy as np

    d = [np.abs(a.astype(float) - b.astype(float)) / 255.0 for a, b in zip(ours[0], theirs[0], strict=True)]
    scale = max(z.abs().max().item() for z in theirs[1])
    latent = max((a.reshape(b.shape) - b).abs().max().item() for a, b in zip(ours[1], theirs[1], strict=True))
    return {"max": float(max(x.max() for x in d)), "mean": float(np.mean([x.mean() for x in d])),
            "latent_max_relative": latent / scale}  # fmt: skip


def with_clip_text_encode(workflow: dict[str, Any], base: Path, folders: dict[str, Path], root: Path) -> tuple:
    """The Edit workflow as sdlora wrote it before TextEncodeQwenImageEditPlus: its prompts through CLIPTextEncode
    (ComfyUI's qwen_image text encoder then applies Qwen-Image's template, cut where ComfyUI's search cuts it with
    the real tokenizer), executed by the fork: (uint8 images, latents) in workflow order."""
    import numpy as np
    import parity_comfy

    from sdlora.families.qwenimage.family import TEMPLATE

    changed = json.loads(json.dumps(workflow))
    for spec in changed.values():
        if spec["class_type"] == "TextEncodeQwenImageEditPlus":
            spec["class_type"], spec["inputs"] = (
                "CLIPTextEncode",
                {"text": spec["inputs"]["prompt"], "clip": spec["inputs"]["clip"]},
            )
    with tiny_loading(base, template_end_real(TEMPLATE), root / "clip-text-encode-latents.pt"):
        saved = parity_comfy.execute(changed, folders)
    prefixes = [s["inputs"]["filename_prefix"] for s in changed.values() if s["class_type"] == "SaveImage"]
    images = [np.clip(255.0 * saved[p][0].float().numpy(), 0, 255).astype(np.uint8) for p in prefixes]
    return images, torch.load(root / "clip-text-encode-latents.pt")

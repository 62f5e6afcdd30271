"""Qwen-Image-Edit (Qwen, 20B, Apache-2.0): Qwen-Image's transformer, VAE and Qwen2.5-VL with images in the prompt.
The reference (control) images enter twice: in the VL prompt ("Picture 1: <|vision_start|>...") at about 384x384,
and as VAE latent tokens appended after the target's tokens at about 1024x1024; the loss and the output are the
target's tokens alone. Edit-2511 sets the transformer's `zero_cond_t` (reference tokens modulated at t = 0).

Everything else is Qwen-Image's (sdlora.families.qwenimage): this family is that dataclass with its own names,
template and detection, and what an edit model adds: a prompt encoded with its picture (`encode_with_pictures`,
edit training's control images), control tokens in `predict`, a text-to-image pipeline for renders without
references (the Edit pipelines need an image), single files that hold the transformer under Qwen-Image's names
(`load_single_file`, with an Edit folder's configs) and ComfyUI's reference nodes. Subclassed rather than copied,
as SD 1.x/2.x and SDXL share UNetFamily."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sdlora.errors import UsageError
from sdlora.families import Conditioning, pipeline_class
from sdlora.families.comfyui import loader
from sdlora.families.flow import denoiser_config
from sdlora.families.qwenimage.family import (
    CachedPrompts,
    QwenImage,
    pack,
    packed,
    single_file_transformer,
    unpack,
)

# QwenImageEditPlusPipeline's template and its 64 tokens before the user turn. Without pictures it is the prompt a
# text-to-image render and a training run without control images use (for the first Edit too, whose own template
# always holds one picture).
TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # Edit-Plus: one per image, before the prompt
# QwenImageEditPipeline's (the first Edit): its one picture is in the template, without "Picture 1: ".
FIRST_EDIT_TEMPLATE = TEMPLATE.replace("user\n{}", "user\n<|vision_start|><|image_pad|><|vision_end|>{}")
DROP = 64
# The Edit pipelines and how many reference images each takes (Edit-Plus: "1-3 images are recommended").
REFERENCES = (("QwenImageEditPlusPipeline", 3), ("QwenImageEditPipeline", 1))
TEXT_RUNNER = "QwenImageEditTextPipeline"  # text_to_image's QwenImagePipeline on an Edit model's weights
LAYERED = ("use_layer3d_rope", "use_additional_t_cond")  # Qwen-Image-Layered: its own RoPE and timestep input
COMFYUI_PLUS_NOTE = (
    "reference photos: ComfyUI scales them by area to ~384^2 px for the prompt and ~1024^2 px (sides multiples of "
    "8) for the latents, diffusers with Lanczos to sides multiples of 32"
)
ZERO_COND_KEY = "__index_timestep_zero__"  # in a 2511 transformer file: ComfyUI's sign of zero_cond_t
METHOD_NODE = "FluxKontextMultiReferenceLatentMethod"  # ComfyUI's choice of how reference tokens are conditioned
COMFYUI_EDIT_NOTE = "reference photo: ComfyUI scales it by area to ~1024^2 px, diffusers with Lanczos"


@dataclass(frozen=True)
class QwenImageEdit(QwenImage):
    name: str = "qwenedit"
    label: str = "Qwen-Image-Edit"
    single_file_pipeline: str = "QwenImageEditPlusPipeline"
    checkpoint_of: str = "qwenimage"  # Comfy-Org's Edit transformer file: Qwen-Image's names (load_single_file)
    kohya_versions: tuple[str, ...] = ("qwen_image_edit", "qwen-image-edit")
    modelspec_prefix: str = "Qwen-Image-Edit"  # musubi-tuner's ARCH_QWEN_IMAGE_EDIT
    reference_pipelines: tuple[tuple[str, int], ...] = REFERENCES
    edit_training: bool = True  # control images in the prompt (encode_with_pictures), their tokens in predict
    template: str = TEMPLATE
    drop: int = DROP

    def claims(self, pipe: Any) -> bool:
        """An Edit pipeline, or its text-to-image runner (text_to_image)."""
        transformer = getattr(pipe, "transformer", None)
        if type(transformer).__name__ != "QwenImageTransformer2DModel":
            return False
        config = denoiser_config(transformer)
        if any(getattr(config, key, False) for key in LAYERED):
            return False
        return pipeline_class(pipe) in (*dict(REFERENCES), TEXT_RUNNER)

    def claims_checkpoint(self, keys_: set[str]) -> bool:
        return False  # its single files hold the transformer under Qwen-Image's names: --set model.single_file_config

    def variant(self, pipe: Any) -> str:
        """2511 (zero_cond_t), plus (2509: several images) or "" (the first Edit)."""
        if getattr(denoiser_config(pipe.transformer), "zero_cond_t", False):
            return "2511"
        return "plus" if pipeline_class(pipe) == "QwenImageEditPlusPipeline" else ""

    def kohya_base_version(self, prediction_type: str, variant: str = "") -> str:
        return "qwen_image_edit"

    def modelspec_architecture(self, prediction_type: str, variant: str = "") -> str:
        return "Qwen-Image-Edit/lora"

    def encode_with_pictures(self, pipe: Any, encoder: Any, prompts: list[str], pictures: list[Any]) -> Conditioning:
        """As the Edit pipeline `pipe` (its class and processor; `encoder`: its Qwen2.5-VL) encodes each prompt with
        its one input image (PIL, as given to the pipeline, scaled here as its __call__ scales it for the prompt:
        vl_picture): Edit-Plus puts "Picture 1: " and the image before the prompt, the first Edit its template's one
        picture; the last hidden layer, the template's 64 tokens dropped. "prompt_embeds" (B, L, D) and
        "prompt_mask" (B, L), rows zero-padded to the longest and not cut (the pipeline cuts none)."""
        plus = pipeline_class(pipe) != "QwenImageEditPipeline"
        if plus:
            texts = [self.template.format(PICTURE.format(1) + prompt) for prompt in prompts]
        else:
            texts = [FIRST_EDIT_TEMPLATE.format(prompt) for prompt in prompts]
        images = [vl_picture(picture, plus) for picture in pictures]
        device = next(encoder.parameters()).device
        inputs = pipe.processor(text=texts, images=images, padding=True, return_tensors="pt").to(device)
        hidden = encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            output_hidden_states=True,
        )
        masks = inputs["attention_mask"]
        rows = [row[keep.bool()][self.drop :] for row, keep in zip(hidden.hidden_states[-1], masks, strict=True)]
        return packed(rows, max(len(row) for row in rows), encoder.dtype)

    def predict(
        self,
        model: Any,
        noisy: Any,
        timesteps: Any,
        cond: Conditioning,
        micro_conditioning: Any,
        guidance: float | None = None,
    ) -> Any:
        """Qwen-Image's prediction; with "control" latents in `cond` ((B, C, h, w) normalised, one control image)
        their tokens follow the target's (the transformer conditions them at t = 0 on 2511) and only the target's
        tokens come back, as QwenImageEditPlusPipeline does."""
        control = cond.get("control")
        if control is None:
            return super().predict(model, noisy, timesteps, cond, micro_conditioning, guidance)
        b, _, h, w = noisy.shape
        ch, cw = control.shape[-2:]
        mask = cond["prompt_mask"] > 0
        length = max(int(mask.sum(1).max()), 1)
        mask = mask[:, :length]
        tokens = pack(noisy)
        out = model(
            hidden_states=torch_cat([tokens, pack(control.to(noisy.dtype))]),
            encoder_hidden_states=cond["prompt_embeds"][:, :length].to(noisy.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask.long(),
            timestep=timesteps.to(noisy.dtype),
            img_shapes=[[(1, h // 2, w // 2), (1, ch // 2, cw // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out[:, : tokens.shape[1]], h, w).to(noisy.dtype)

    def text_to_image(self, pipe: Any) -> Any:
        """QwenImagePipeline on the Edit pipeline's weights (a subclass named TEXT_RUNNER, so that detection tells
        it from Qwen-Image's), prompts encoded with the Edit template and no picture (cached rows where training
        left them: render_from_cache)."""
        from diffusers import QwenImagePipeline

        if pipeline_class(pipe) not in dict(REFERENCES):
            return pipe
        runner = type(TEXT_RUNNER, (QwenImagePipeline,), {})(
            scheduler=pipe.scheduler,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            transformer=pipe.transformer,
        )
        runner.set_progress_bar_config(disable=True)
        cached = vars(pipe).get("encode_prompt")
        rows = cached.rows if isinstance(cached, CachedPrompts) else LiveRows(self, pipe)
        runner.encode_prompt = CachedPrompts(runner, rows)
        return runner

    def comfyui_parts(self, pipe: Any, base: str, width: int, height: int, cfg: float) -> Any:
        """Qwen-Image's nodes (the same loaders); reference photos through the Edit prompt encoder with the VAE
        (TextEncodeQwenImageEditPlus, or the first Edit's TextEncodeQwenImageEdit), on 2511 with its reference
        method (zero_cond_t: the photos' tokens at t = 0, ComfyUI's index_timestep_zero)."""
        parts = super().comfyui_parts(pipe, base, width, height, cfg)
        plus = pipeline_class(pipe) != "QwenImageEditPipeline"
        method = "index_timestep_zero" if self.variant(pipe) == "2511" else None
        return replace(
            parts,
            prompt_node=("TextEncodeQwenImageEditPlus", "prompt"),  # the Edit template (CLIPTextEncode: Qwen-Image's)
            references="TextEncodeQwenImageEditPlus" if plus else "TextEncodeQwenImageEdit",
            reference_method=loader(METHOD_NODE, reference_latents_method=method) if method else None,
            reference_notes=(COMFYUI_PLUS_NOTE if plus else COMFYUI_EDIT_NOTE,),
        )

    def save_single_file(self, pipe: Any, path: Any) -> None:
        """The transformer alone under Qwen-Image's names, as Comfy-Org ships the Edit transformer; 2511's with the
        empty `__index_timestep_zero__` tensor by which ComfyUI tells it (comfy/model_detection.py; diffusers'
        loader ignores it)."""
        import torch
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
        if self.variant(pipe) == "2511":
            state[ZERO_COND_KEY] = torch.tensor([])
        save_file(state, str(path))

    def tiny_pipeline(self, seed: int) -> Any:
        from sdlora.families.qwenedit.tiny import tiny_qwenedit_pipeline

        return tiny_qwenedit_pipeline(seed=seed)

    def load_single_file(self, path: Any, config: str | None, kwargs: dict[str, Any]) -> Any:
        """Comfy-Org's Edit transformer file (ComfyUI's diffusion_models, Qwen-Image's names) with the rest of the
        Edit pipeline `config` (its processor, and its transformer config: 2511's zero_cond_t)."""
        from diffusers import DiffusionPipeline

        from sdlora.families.qwenedit.processor import load_kwargs

        if config is None:
            raise UsageError(
                f"{path}: a Qwen-Image-Edit single file holds the transformer only; name a diffusers Edit folder or "
                "hub id for the rest and the configs: --set model.single_file_config=Qwen/Qwen-Image-Edit-2511"
            )
        transformer, kwargs = single_file_transformer(path, config, kwargs)
        stand_ins = {name: part for name, part in load_kwargs(config).items() if name not in kwargs}
        return DiffusionPipeline.from_pretrained(config, transformer=transformer, **stand_ins, **kwargs)


def vl_picture(picture: Any, plus: bool) -> Any:
    """An input image as the Edit pipeline's __call__ scales it for the VL prompt: Edit-Plus to about
    CONDITION_IMAGE_SIZE (384^2) px, the first Edit to about 1024^2 px, the aspect ratio kept, sides multiples of
    32 (read from diffusers' modules at each call)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    ratio = picture.width / picture.height
    if plus:
        width, height = edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE, ratio)
    else:
        width, height, _ = edit.calculate_dimensions(1024 * 1024, ratio)
    return VaeImageProcessor().resize(picture, height, width)


def torch_cat(parts: list[Any]) -> Any:
    import torch

    return torch.cat(parts, dim=1)


class LiveRows(dict):
    """Prompt -> conditioning row, encoded on first use with the family's template (text_to_image)."""

    def __init__(self, family: QwenImageEdit, pipe: Any) -> None:
        super().__init__()
        self.family, self.pipe = family, pipe

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str)

    def __missing__(self, prompt: str) -> Conditioning:
        import torch

        with torch.no_grad():
            cond = self.family.encode_prompts([self.pipe.tokenizer], [self.pipe.text_encoder], [prompt])
        self[prompt] = {key: value[0] for key, value in cond.items()}
        return self[prompt]


QWENEDIT = QwenImageEdit()

"""Qwen-Image-Edit (Qwen, 20B, Apache-2.0): Qwen-Image's transformer, VAE and Qwen2.5-VL with images in the prompt.
The reference (control) images enter twice: in the VL prompt ("Picture 1: <|vision_start|>...") at about 384x384,
and as VAE latent tokens appended after the target's tokens at about 1024x1024; the loss and the output are the
target's tokens alone. Edit-2511 sets the transformer's `zero_cond_t` (reference tokens modulated at t = 0).

Everything else is Qwen-Image's (sdlora.families.qwenimage): this family is that dataclass with its own names,
template and detection, and the two things an edit model adds: control tokens in `predict` and a text-to-image
pipeline for renders without references (the Edit pipelines need an image). Subclassed rather than copied, as
SD 1.x/2.x and SDXL share UNetFamily."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sdlora.errors import UsageError
from sdlora.families import Conditioning, pipeline_class
from sdlora.families.flow import denoiser_config
from sdlora.families.qwenimage.family import CachedPrompts, QwenImage, pack, unpack

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
DROP = 64
# The Edit pipelines and how many reference images each takes (Edit-Plus: "1-3 images are recommended").
REFERENCES = (("QwenImageEditPlusPipeline", 3), ("QwenImageEditPipeline", 1))
TEXT_RUNNER = "QwenImageEditTextPipeline"  # text_to_image's QwenImagePipeline on an Edit model's weights
LAYERED = ("use_layer3d_rope", "use_additional_t_cond")  # Qwen-Image-Layered: its own RoPE and timestep input


@dataclass(frozen=True)
class QwenImageEdit(QwenImage):
    name: str = "qwenedit"
    label: str = "Qwen-Image-Edit"
    single_file_pipeline: str = "QwenImageEditPlusPipeline"
    kohya_versions: tuple[str, ...] = ("qwen_image_edit", "qwen-image-edit")
    modelspec_prefix: str = "Qwen-Image-Edit"  # musubi-tuner's ARCH_QWEN_IMAGE_EDIT
    reference_pipelines: tuple[tuple[str, int], ...] = REFERENCES
    edit_training: bool = True  # control images' latent tokens after the target's (predict)
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
        """Qwen-Image's nodes (the same loaders) for the text-to-image render, the prompts encoded by
        TextEncodeQwenImageEditPlus without an image: the Edit template this family renders with (CLIPTextEncode
        applies Qwen-Image's); its notes say the references are not in the workflow."""
        parts = super().comfyui_parts(pipe, base, width, height, cfg)
        note = "Qwen-Image-Edit's reference images are not in this workflow (TextEncodeQwenImageEditPlus takes them)"
        return replace(parts, notes=(*parts.notes, note), prompt_node=("TextEncodeQwenImageEditPlus", "prompt"))

    def tiny_pipeline(self, seed: int) -> Any:
        from sdlora.families.qwenedit.tiny import tiny_qwenedit_pipeline

        return tiny_qwenedit_pipeline(seed=seed)

    def load_single_file(self, path: Any, config: str | None, kwargs: dict[str, Any]) -> Any:
        raise UsageError(f"{path}: give Qwen-Image-Edit as a diffusers folder or hub id (Qwen/Qwen-Image-Edit-2511)")


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

"""FLUX.2's two sets of module names: diffusers' (Flux2Transformer2DModel) and Black Forest Labs' original ones (the
released single files `flux-2-klein-4b.safetensors`, kohya/musubi LoRA names, ComfyUI), where a double block's q, k
and v are one fused `img_attn.qkv` (`txt_attn.qkv` for the text stream) and a single block's attention and MLP
input is one `linear1`. Used for the kohya LoRA names ComfyUI reads (`lora_unet_double_blocks_0_img_attn_qkv`) and to
write whole transformers in the original names (single files). DoRA and LoKr, one module per layer, use
SimpleTuner's `lycoris_` + diffusers names instead, which ComfyUI's Flux map puts into the qkv rows itself
(sdlora.lora.kohya.denoiser_naming)."""

from __future__ import annotations

from sdlora.families.flux.keys import BflNames

# Inside double block N: diffusers linear module -> (BFL module, part, parts); parts > 1: rows of a fused layer.
DOUBLE_LINEAR = {
    "attn.to_q": ("img_attn.qkv", 0, 3),
    "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.linear_in": ("img_mlp.0", 0, 1),
    "ff.linear_out": ("img_mlp.2", 0, 1),
    "ff_context.linear_in": ("txt_mlp.0", 0, 1),
    "ff_context.linear_out": ("txt_mlp.2", 0, 1),
}
# A single block's q, k, v and MLP input are one layer in diffusers too (to_qkv_mlp_proj), in the same row order.
SINGLE_LINEAR = {
    "attn.to_qkv_mlp_proj": ("linear1", 0, 1),
    "attn.to_out": ("linear2", 0, 1),
}
TOP_LINEAR = {
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # BFL stores (shift, scale), diffusers (scale, shift)
}
# What diffusers' own single-file detection looks for; FLUX.1 has no global modulation.
MARKER = "single_stream_modulation.lin.weight"
GUIDANCE_MARKER = "guidance_in.in_layer.weight"  # FLUX.2 [dev]'s guidance embedding: not klein
COMFYUI_PREFIX = "model.diffusion_model."


def claims(keys: set[str]) -> bool:
    """True for a FLUX.2 [klein] transformer's original-format keys (bare or under ComfyUI's prefix): FLUX.2's
    global modulation without [dev]'s guidance embedding."""
    bare = {key.removeprefix(COMFYUI_PREFIX) for key in keys}
    return MARKER in bare and GUIDANCE_MARKER not in bare


# diffusers <-> BFL as diffusers' convert_flux2_transformer_checkpoint_to_diffusers maps them (its inverse: to_bfl);
# the block patterns, the norms and the fusing are FLUX.1's (sdlora.families.flux.keys.BflNames).
KLEIN_NAMES = BflNames(DOUBLE_LINEAR, SINGLE_LINEAR, TOP_LINEAR)
bfl_module, to_bfl = KLEIN_NAMES.module, KLEIN_NAMES.to_bfl

"""Tiny pipelines built from configs with random weights, for tests and the demo.

They are saved in diffusers folder format so that every loading path is the real one (`from_pretrained`
on a local folder). The tokenizer is the real CLIP BPE (49,408 tokens), built offline from the vocabulary
file that the `open-clip-torch` package ships (install it with `pip install --no-deps open-clip-torch`:
its dependencies pull torchvision and a CUDA torch, and we never import it). Flux's T5 tokenizer is a small
Unigram vocabulary with T5's special ids (<pad> 0, </s> 1, <unk> 2), built without any file.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from sdlora.errors import SdloraError
from sdlora.families import NAMES

FAMILIES = tuple(sorted(NAMES))  # every registered family, in name order
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def clip_bpe_path() -> Path:
    """Path of CLIP's BPE vocabulary shipped inside the open-clip-torch package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SdloraError(
            "the tiny built-in model needs CLIP's vocabulary from open-clip-torch: "
            "run `pip install --no-deps open-clip-torch==3.3.0`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE
    if not path.is_file():
        raise SdloraError(f"{path}: CLIP vocabulary missing; reinstall with `pip install --no-deps open-clip-torch`")
    return path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt of the real CLIP tokenizer into `folder`."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the 48,894 merges CLIP uses
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer (49,408 tokens, max length 77), built offline in `folder`."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_clip_vocab(folder)
    # transformers 5 takes the file paths as `vocab`/`merges`; without model_max_length=77 diffusers'
    # pipelines fail with "int too big to convert".
    return CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), pad_token=pad_token, model_max_length=77)


def _text_encoder_config(hidden_act: str = "quick_gelu", projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks give the real 8x downsampling, so latent shapes and SDXL crop maths match the real models.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    )


def build_tiny_pipeline(family: str, seed: int = 0):
    """A tiny, randomly initialised pipeline of `family` (diffusers classes, real CLIP tokenizer)."""
    from sdlora import families

    return families.get(family).tiny_pipeline(seed)


# Both tiny UNets: two blocks of two layers, the second with cross-attention.
_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def tiny_sd_pipeline(v2: bool, seed: int = 0):
    """Tiny SD 1.x (epsilon, quick-GELU CLIP) or SD 2.x (v-prediction, linear projections, GELU CLIP)."""
    import tempfile

    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "tok")
    unet = UNet2DConditionModel(
        **_UNET, cross_attention_dim=32, attention_head_dim=(2, 4) if v2 else 8, use_linear_projection=v2
    )
    scheduler = sd_scheduler("v_prediction" if v2 else "epsilon")
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(hidden_act="gelu" if v2 else "quick_gelu")),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """Tiny SDXL: two text encoders (the second with a projection), text_time conditioning, Euler."""
    import tempfile

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "tok")
        tokenizer_2 = clip_tokenizer(Path(tmp) / "tok2", pad_token="!")
    unet = UNet2DConditionModel(
        **_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text (32)
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(hidden_act="gelu")),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


# T5's special pieces first (ids 0, 1, 2 as in the real tokenizer), then words of the tests' prompts, then single
# characters so that any lowercase prompt tokenizes without <unk>.
_T5_WORDS = [
    "a",
    "photo",
    "of",
    "sks",
    "person",
    "man",
    "woman",
    "cat",
    "dog",
    "portrait",
    "oil",
    "painting",
    "in",
    "the",
    "an",
    "at",
    "by",
    "with",
]
_T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-{}"


def t5_tokenizer(max_length: int = 512) -> Any:
    """A T5 (Unigram) tokenizer with T5's special ids, made in memory: no file, no sentencepiece."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{word}", -2.0) for word in _T5_WORDS] + [(char, -5.0) for char in _T5_CHARS]
    vocab += [(f"▁{char}", -4.0) for char in _T5_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _flux_vae():
    from diffusers import AutoencoderKL

    # Flux's AE: no quant convs, latents normalised with a shift and a scale (the real ones: 0.1159, 0.3611).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def flux_scheduler(schnell: bool = False) -> Any:
    """Flux.1's own FlowMatchEulerDiscreteScheduler config: dev shifts by image size at inference, schnell not."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if schnell:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )


def tiny_flux_pipeline(seed: int = 0, schnell: bool = False, layers: int = 1, single_layers: int = 1) -> Any:
    """Tiny Flux.1 (dev: guidance embedding; schnell: none): CLIP-L-like pooled text, a 2-layer T5, a transformer
    with `layers` double and `single_layers` single blocks, the 16-channel packing of 2x2 patches of 4 latents."""
    import tempfile

    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "tok")
    tokenizer_2 = t5_tokenizer(256 if schnell else 512)
    t5 = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=not schnell,
    )
    return FluxPipeline(
        scheduler=flux_scheduler(schnell),
        vae=_flux_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(hidden_act="quick_gelu")),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def save_tiny_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline of `family` and save it as a diffusers folder; returns the folder."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


def sd_scheduler(prediction_type: str = "epsilon") -> Any:
    """DDIM with Stable Diffusion's own noise schedule (the tiny models' and the identity benchmark's base)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )

"""Edit training's text conditioning: each caption (and the empty one of caption dropout) encoded with its example's
control image, as the edit pipeline encodes a prompt with its input image at inference (Qwen-Image-Edit: the
picture in Qwen2.5-VL's prompt), once per (prompt, control image, training size, flip) before training; rows
joined to the captions' table under `key`, which the batches look up."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sdlora.train.data import Example

CHUNK = 8  # (prompt, picture) pairs per text-encoder pass


def wanted(examples: list[Example], family: Any) -> bool:
    """Whether the run's captions are encoded with control images: an edit model given them."""
    return family.edit_training and any(e.control for e in examples)


def key(prompt: str, example: Example, size: int, flipped: bool) -> tuple[str, str, int, bool]:
    """The table key of `prompt` with `example`'s control image as cut at training resolution `size`, mirrored
    with its image when `flipped` (the control latents are)."""
    return (prompt, str(example.control), size, bool(flipped))


def picture(example: Example, size: int, flipped: bool) -> Any:
    """The control image as a PIL image, cut exactly as its latents are (load_example at `size`), mirrored."""
    import torch
    from PIL import Image

    from sdlora.train.data import load_example

    pixels = load_example(replace(example, image=example.control), size)[0]  # (3, H, W) in [-1, 1]
    if flipped:
        pixels = torch.flip(pixels, dims=[-1])
    array = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def pairs(examples: list[Example], sizes: list[int], flip: bool) -> dict[tuple, tuple[str, Example, int, bool]]:
    """Every key the batches can ask for: each example with a control image at each size and flip, with its
    caption and with "" (caption dropout)."""
    found: dict[tuple, tuple[str, Example, int, bool]] = {}
    for example in (e for e in examples if e.control):
        for size in sizes:
            for flipped in (False, True) if flip else (False,):
                for prompt in (example.caption, ""):
                    found.setdefault(key(prompt, example, size, flipped), (prompt, example, size, flipped))
    return found


def build_cache(family: Any, pipe: Any, encoder: Any, examples: list[Example], train: Any) -> dict[str, Any]:
    """The conditioning table (as sdlora.train.batches' text cache) of every pair, encoded by the family as its
    edit pipeline `pipe` would (`encoder`: the frozen text encoder, wherever it is held)."""
    import torch

    wanted_pairs = pairs(examples, train.resolutions or [train.resolution], train.flip)
    keys, parts = list(wanted_pairs), []
    with torch.no_grad():
        for start in range(0, len(keys), CHUNK):
            chunk = [wanted_pairs[k] for k in keys[start : start + CHUNK]]
            pictures = [picture(example, size, flipped) for _, example, size, flipped in chunk]
            parts.append(family.encode_with_pictures(pipe, encoder, [prompt for prompt, *_ in chunk], pictures))
    return {"prompts": {k: i for i, k in enumerate(keys)}, "cond": stacked(parts)}


def join(table: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One table of both: rows zero-padded to the longer length (the denoiser trims padding per batch), `extra`'s
    after `table`'s."""
    offset = next(iter(table["cond"].values())).shape[0]
    prompts = {**table["prompts"], **{k: offset + i for k, i in extra["prompts"].items()}}
    return {"prompts": prompts, "cond": stacked([table["cond"], extra["cond"]])}


def stacked(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts' rows in one table: each part's (N, L, ...) tensors zero-padded along L to the longest part's,
    concatenated along N."""
    import torch

    length = max(value.shape[1] for part in parts for value in part.values())

    def pad(value: Any) -> Any:
        extra = value.new_zeros(value.shape[0], length - value.shape[1], *value.shape[2:])
        return torch.cat([value, extra], dim=1)

    return {name: torch.cat([pad(part[name]) for part in parts]) for name in parts[0]}

"""What every section of the config shares: the frozen, strict pydantic base, the numeric bounds that keep
values from failing deep inside torch or numpy, and the small value checks several sections use."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Images with more pixels than this are refused as decompression bombs or huge scans (prep.max_pixels).
MAX_PIXELS = 120_000_000

# Upper bounds of the numbers that would otherwise reach torch or numpy and fail there (or exhaust memory).
MAX_RESOLUTION = 4096  # px: SDXL trains at 1024; 4096 is already 16x its memory
MAX_SEED = 2**32 - 1  # A1111's range; torch takes 64-bit seeds, but seed + i must stay in range
MAX_STEPS = 10_000_000
MAX_IMAGES = 100_000  # images per prompt, class images, batch sizes
# prep's default vision-language captioner (why this one: sdlora/prep/captioner.py).
DEFAULT_CAPTIONER = "HuggingFaceTB/SmolVLM-Instruct"


class Section(BaseModel):
    # allow_inf_nan=False: every float setting is finite (`--lr inf` and `nan` are refused here, not in torch).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be divisible by 8 (got {value}); try {max(8, value // 8 * 8)}")
    return value


def parse_size(value: str) -> tuple[int, int]:
    """'512x768' -> (512, 768), each side divisible by 8."""
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 512x512 (got {value!r})") from None
    for side in (width, height):
        if side <= 0 or side % 8 or side > MAX_RESOLUTION:
            raise ValueError(
                f"each side of size must be a positive multiple of 8, at most {MAX_RESOLUTION} (got {value!r})"
            )
    return width, height

"""contact_sheet.jpg: kept crops in a grid, then skipped photos labelled with their reason, to see a set at a glance."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont

from sdlora.errors import printable

TILE = 160  # px, side of one cell
LABEL = 18  # px, height of the text strip under each cell
COLUMNS = 6
GAP = 24  # px, band between the kept and the skipped part (holds its heading)
BACKGROUND = (32, 32, 32)
TEXT = (235, 235, 235)
SKIPPED_TEXT = (255, 150, 120)


def sheet_size(kept: int, skipped: int) -> tuple[int, int]:
    """(width, height) of the sheet for this many kept and skipped photos."""
    rows = math.ceil(kept / COLUMNS) + math.ceil(skipped / COLUMNS)
    return COLUMNS * TILE, GAP * 2 + rows * (TILE + LABEL)


def contact_sheet(
    kept: list[tuple[str, Image.Image | None]], skipped: list[tuple[str, Image.Image | None]], quality: int = 90
) -> bytes:
    """JPEG bytes of the sheet; each entry is (label, thumbnail or None when the file could not be decoded)."""
    sheet = Image.new("RGB", sheet_size(len(kept), len(skipped)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    y = 0
    for heading, entries, colour in (
        (f"kept: {len(kept)}", kept, TEXT),
        (f"skipped: {len(skipped)}", skipped, SKIPPED_TEXT),
    ):
        draw.text((6, y + 5), heading, fill=colour, font=font)
        y += GAP
        for index, (label, thumb) in enumerate(entries):
            x = (index % COLUMNS) * TILE
            top = y + (index // COLUMNS) * (TILE + LABEL)
            if thumb is not None:
                sheet.paste(thumb, (x + (TILE - thumb.width) // 2, top + (TILE - thumb.height) // 2))
            else:
                draw.rectangle((x + 4, top + 4, x + TILE - 5, top + TILE - 5), outline=(90, 90, 90))
            draw.text((x + 4, top + TILE + 3), _fit(draw, label, font), fill=colour, font=font)
        y += math.ceil(len(entries) / COLUMNS) * (TILE + LABEL)
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """`text` shortened with an ellipsis to fit one cell; file names that are not valid UTF-8 or hold control
    characters are escaped, and Pillow's bitmap font (without FreeType) gets Latin-1 only."""
    text = printable(text)
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "backslashreplace").decode("latin-1")
    while len(text) > 1 and draw.textlength(text, font=font) > TILE - 8:
        text = text[:-4] + "..."
    return text

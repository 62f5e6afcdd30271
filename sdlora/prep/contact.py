"""contact_sheet.jpg: kept crops in a grid (labelled with their file name, or their caption wrapped over a few lines),
then skipped photos labelled with their reason, to see a set at a glance."""

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
CAPTION_LINES = 5  # lines of a kept crop's caption under it (longer captions end in "...")
LINE = 12  # px a caption line takes


def sheet_size(kept: int, skipped: int, lines: int = 1) -> tuple[int, int]:
    """(width, height) of the sheet for this many kept and skipped photos, with `lines` lines under each kept one."""
    kept_rows = math.ceil(kept / COLUMNS) * (TILE + LABEL + (lines - 1) * LINE)
    skipped_rows = math.ceil(skipped / COLUMNS) * (TILE + LABEL)
    return COLUMNS * TILE, GAP * 2 + kept_rows + skipped_rows


def contact_sheet(
    kept: list[tuple[str, Image.Image | None]],
    skipped: list[tuple[str, Image.Image | None]],
    quality: int = 90,
    lines: int = 1,
) -> bytes:
    """JPEG bytes of the sheet; each entry is (label, thumbnail or None when the file could not be decoded); kept
    labels wrap over up to `lines` lines (captions)."""
    sheet = Image.new("RGB", sheet_size(len(kept), len(skipped), lines), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    y = 0
    for heading, entries, colour, rows in (
        (f"kept: {len(kept)}", kept, TEXT, lines),
        (f"skipped: {len(skipped)}", skipped, SKIPPED_TEXT, 1),
    ):
        draw.text((6, y + 5), heading, fill=colour, font=font)
        y += GAP
        height = TILE + LABEL + (rows - 1) * LINE
        for index, (label, thumb) in enumerate(entries):
            x = (index % COLUMNS) * TILE
            top = y + (index // COLUMNS) * height
            if thumb is not None:
                sheet.paste(thumb, (x + (TILE - thumb.width) // 2, top + (TILE - thumb.height) // 2))
            else:
                draw.rectangle((x + 4, top + 4, x + TILE - 5, top + TILE - 5), outline=(90, 90, 90))
            for number, text in enumerate(_wrap(draw, label, font, rows)):
                draw.text((x + 4, top + TILE + 3 + number * LINE), text, fill=colour, font=font)
        y += math.ceil(len(entries) / COLUMNS) * height
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, lines: int) -> list[str]:
    """`text` over at most `lines` lines of one cell's width; what does not fit ends the last line in "..."."""
    if lines <= 1:
        return [_fit(draw, text, font)]
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(_drawable(f"{line} {words[0]}", font), font=font) <= TILE - 8:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words:
        out[-1] = f"{out[-1]} {' '.join(words)}"
    return [_fit(draw, line, font) for line in out]


def _drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """File names that are not valid UTF-8 or hold control characters escaped; Pillow's bitmap font (without
    FreeType) gets Latin-1 only."""
    text = printable(text)
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "backslashreplace").decode("latin-1")
    return text


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """`text` shortened with an ellipsis to fit one cell; file names that are not valid UTF-8 or hold control
    characters are escaped, and Pillow's bitmap font (without FreeType) gets Latin-1 only."""
    text = _drawable(text, font)
    while len(text) > 1 and draw.textlength(text, font=font) > TILE - 8:
        text = text[:-4] + "..."
    return text

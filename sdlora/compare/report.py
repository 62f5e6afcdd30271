"""`sdlora compare`'s outputs: the result model (report.json), the ranking, the terminal table, the contact sheets
and report.html."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from sdlora import fsutil
from sdlora.errors import printable
from sdlora.evaluation.metrics import Summary, reading

SCHEMA = "sdlora.compare/1"
REPORT_JSON, REPORT_HTML = "report.json", "report.html"
REPORT_MARKER = '<meta name="generator" content="sdlora compare">'
CELL = 128  # px, side of a contact sheet's cell
# The table's columns: a Summary number (or the route's time) and its heading.
COLUMNS = (
    ("identity", "identity"),
    ("recognised_rate", "recognised"),
    ("face_rate", "faces"),
    ("bleed", "bleed"),
    ("diversity", "diversity"),
    ("prompt_fidelity", "prompt fidelity"),
    ("seconds_per_image", "s / image"),
)


class RouteResult(BaseModel):
    """One route's scores: what it was, where its images are, the summary of `sdlora eval` over them."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(description="1 keeps the face best: recognised rate first, then identity.")
    label: str
    kind: str
    spec: str = Field(description="The --route as given.")
    base: str | None = None
    folder: str = Field(description="The route's images (OUT/routes/LABEL when compare rendered them).")
    sheet: str = Field(description="Contact sheet, relative to OUT.")
    seconds_per_image: float | None = Field(description="Wall time of its generate / images (loading included).")
    summary: Summary
    notes: list[str] = Field(default_factory=list)


class CompareResult(BaseModel):
    """Everything report.json holds."""

    model_config = ConfigDict(extra="forbid")

    schema_: str = Field(SCHEMA, alias="schema")
    face_model: str
    threshold: float
    reference: list[str]
    prompts: list[str] = Field(
        description="The prompt templates every rendered route used ({trigger} filled per route)."
    )
    n: int = Field(description="Images per prompt (seeds seed, seed+1, ...).")
    seed: int
    routes: list[RouteResult]
    notes: list[str] = Field(default_factory=list)


def rank_key(summary: Summary) -> tuple[float, float]:
    """Higher is better: the share of all images recognised as the person, then the mean identity."""
    return (summary.recognised_rate, summary.identity if summary.identity is not None else -1.0)


def value(route: RouteResult, key: str) -> Any:
    return route.seconds_per_image if key == "seconds_per_image" else getattr(route.summary, key)


def fmt(number: Any) -> str:
    if number is None:
        return "-"
    return f"{number:.3f}" if isinstance(number, float) else str(number)


def contact_sheet(images: list[Image.Image], cols: int) -> Image.Image:
    """Thumbnails of a route's images, `cols` a row (one row per prompt when cols = n)."""
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * CELL, rows * CELL), (255, 255, 255))
    for i, image in enumerate(images):
        thumb = ImageOps.contain(image.convert("RGB"), (CELL, CELL))  # small images (64 px toys) scaled up too
        left, top = (i % cols) * CELL + (CELL - thumb.width) // 2, (i // cols) * CELL + (CELL - thumb.height) // 2
        sheet.paste(thumb, (left, top))
    return sheet


def write_sheet(image: Image.Image, path: Path) -> None:
    with fsutil.atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=88)


def print_table(result: CompareResult, report: Path, console: Any = None) -> None:
    """The ranked table (narrow enough for 80 columns), the notes (each once), and where the report is."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    title = f"routes ranked (face model {result.face_model}, same person under {result.threshold:.3g})"
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    for heading in ("#", "route", "images", *(SHORT.get(h, h) for _, h in COLUMNS)):
        table.add_column(heading, justify="left" if heading == "route" else "right", no_wrap=heading != "route")
    for route in result.routes:
        numbers = [fmt(value(route, key)) for key, _ in COLUMNS]
        table.add_row(str(route.rank), Text(route.label), str(route.summary.images), *numbers)
    console.print(table)
    notes = result.notes + [f"{r.label}: {n}" for r in result.routes for n in r.notes if not _everywhere(n, result)]
    notes += list(dict.fromkeys(n for r in result.routes for n in r.notes if _everywhere(n, result)))
    for note in notes:
        console.print(Text(f"note: {printable(note)}"))
    console.print(Text(f"wrote {printable(report)} and {REPORT_JSON}"))


SHORT = {"prompt fidelity": "CLIP", "recognised": "recog.", "diversity": "divers.", "s / image": "s/img"}


def _everywhere(note: str, result: CompareResult) -> bool:
    """A note every route has (no CLIP model given): said once, not once per route."""
    return len(result.routes) > 1 and all(note in r.notes for r in result.routes)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; text-align: right; border-bottom: 1px solid #ddd; }
td.l, th.l { text-align: left; } .sheet img { max-width: 100%; } .refs img { height: 96px; margin: 2px; }
"""


def render_html(result: CompareResult, ref_names: list[str]) -> str:
    esc = _esc
    head = "".join(f'<th class="l">{h}</th>' for h in ("rank", "route", "kind")) + "<th>images</th>"
    head += "".join(f'<th title="{esc(_meaning(key, result))}">{h}</th>' for key, h in COLUMNS)
    rows = "".join(
        f'<tr><td class="l">{r.rank}</td><td class="l"><a href="#{esc(r.label)}">{esc(r.label)}</a></td>'
        f'<td class="l">{esc(r.kind)}</td><td>{r.summary.images}</td>'
        + "".join(f"<td>{fmt(value(r, key))}</td>" for key, _ in COLUMNS)
        + "</tr>"
        for r in result.routes
    )
    sheets = "".join(
        f'<h3 id="{esc(r.label)}">{r.rank}. {esc(r.label)} <small>({esc(r.spec)})</small></h3>'
        f'<div class="sheet"><img src="{esc(r.sheet)}" alt="contact sheet of {esc(r.label)}"></div>'
        + "".join(f"<p>note: {esc(n)}</p>" for n in r.notes if not _everywhere(n, result))
        for r in result.routes
    )
    meanings = "".join(f"<li><b>{h}</b>: {esc(_meaning(key, result))}</li>" for key, h in COLUMNS)
    prompts = "".join(f"<li><code>{esc(p)}</code></li>" for p in result.prompts)
    prompts = f"<h2>Prompts of the rendered routes</h2>\n<ul>{prompts}</ul>\n" if any_rendered(result) else ""
    refs = "".join(f'<img src="{esc(name)}" alt="reference {i}">' for i, name in enumerate(ref_names))
    common = dict.fromkeys(n for r in result.routes for n in r.notes if _everywhere(n, result))
    notes = "".join(f"<li>{esc(note)}</li>" for note in [*result.notes, *common])
    same = (
        f"; the same {len(result.prompts)} prompt(s) x {result.n} seed(s) from {result.seed} in each rendered route"
        if any_rendered(result)
        else ""
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{REPORT_MARKER}'
        f"<title>sdlora compare</title><style>{CSS}</style></head><body>\n<h1>sdlora compare</h1>\n"
        f"<p>{len(result.routes)} route(s), scored by face model <b>{esc(result.face_model)}</b> against "
        f"{len(result.reference)} reference photo(s){same}.</p>\n"
        f"<table><tr>{head}</tr>{rows}</table>\n<ul>{meanings}</ul>\n<ul>{notes}</ul>\n"
        f"<h2>Contact sheets</h2>\n{sheets}\n{prompts}"
        f'<h2>Reference set</h2>\n<div class="refs">{refs}</div>\n</body></html>\n'
    )


def any_rendered(result: CompareResult) -> bool:
    return any(route.kind != "folder" for route in result.routes)


def _meaning(key: str, result: CompareResult) -> str:
    if key == "seconds_per_image":
        return "wall time of the route's generate divided by its images, model loading included; - for folders"
    meaning, good = reading(key, result.threshold)
    return f"{meaning} (good: {good})"


def _esc(text: str) -> str:
    return html.escape(printable(str(text)))

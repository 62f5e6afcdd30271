"""Evaluation outputs: the result model (the --json schema), the terminal table, and the HTML report."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticSerializationError

from sdlora.errors import UsageError, printable
from sdlora.evaluation.edits import JUDGED_BY, EditSummary
from sdlora.evaluation.edits import READING as EDIT_READING
from sdlora.evaluation.metrics import READINGS, ImageScore, Summary, reading
from sdlora.fsutil import atomic_dir, atomic_write_text, read_marker

SCHEMA = "sdlora.eval/1"
REPORT_MARKER = '<meta name="generator" content="sdlora eval">'
THUMB = 160  # px, longest side of the reference thumbnails


class EvalResult(BaseModel):
    """Everything `sdlora eval --json` writes: settings, the reference set, per-image scores, the summary."""

    model_config = ConfigDict(extra="forbid")

    schema_: str = Field(SCHEMA, alias="schema")
    face_model: str
    threshold: float = Field(description="Same-person distance of the face model.")
    reference: list[str] = Field(description="Reference photos.")
    reference_faces: int = Field(description="Reference photos in which a face was found.")
    lora: str | None = None
    trigger: str | None = None
    summary: Summary
    edits: EditSummary | None = Field(
        None, exclude_if=lambda value: value is None, description="Editability; absent where it was not judged."
    )
    images: list[ImageScore]
    notes: list[str] = Field(default_factory=list)

    def to_json(self) -> str:
        try:
            return self.model_dump_json(by_alias=True, indent=2) + "\n"
        except PydanticSerializationError:  # a file name that is not valid UTF-8: written escaped
            clean = type(self).model_validate(_printable_strings(self.model_dump(by_alias=True)))
            return clean.model_dump_json(by_alias=True, indent=2) + "\n"


def _printable_strings(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {key: _printable_strings(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_printable_strings(item) for item in value)
    return value


def _esc(text: str) -> str:
    return html.escape(printable(text))


def write_json(result: EvalResult, path: Path) -> None:
    atomic_write_text(Path(path), result.to_json())


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


SUMMARY_ROWS = tuple(READINGS)  # every Summary number, in this order


def summary_title(result: EvalResult) -> str:
    return (
        f"summary (face model {result.face_model}: two faces are the same person under distance {result.threshold:.3g})"
    )


def _value(result: EvalResult, key: str) -> str:
    """The number, with its count where it is a share of images: '0.500 (3/6)'."""
    data = result.summary
    value = _fmt(getattr(data, key))
    if key == "face_rate":
        return f"{value} ({data.images_with_face}/{data.images})"
    if key == "recognised_rate":
        return f"{value} ({sum(s.recognised for s in result.images)}/{data.images})"
    return value


def summary_rows(result: EvalResult) -> list[tuple[str, str, str, str]]:
    """(metric, value, what it means, what good looks like) of every summary number; editability after bleed, only
    where it was measured."""
    rows = [(key, _value(result, key), *reading(key, result.threshold)) for key in SUMMARY_ROWS]
    found = result.edits
    if found is not None:
        meaning, good = EDIT_READING
        each = ", ".join(f"{phrase} {share:.2f}" for phrase, share in found.by_edit.items())
        value = f"{found.editability:.3f} ({found.edited}/{found.images}; {each})"
        at = SUMMARY_ROWS.index("bleed") + 1
        rows.insert(at, ("editability", value, meaning.format(judge=JUDGED_BY[found.judge]), good))
    return rows


def print_table(result: EvalResult, console: Any = None) -> None:
    """Per-prompt rows and the summary, as rich tables."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Prompts, file names and notes are plain text: as rich markup, A1111's [square brackets] would vanish or
    # raise MarkupError after all the scoring.
    console = console or Console()
    per_prompt = Table(title="per prompt")
    columns = ("prompt", "images", "faces", "identity", "recognised") + (("edited",) if result.edits else ())
    for column in columns:
        per_prompt.add_column(column, justify="left" if column == "prompt" else "right")
    for prompt, rows in _by_prompt(result.images).items():
        sims = [r.similarity for r in rows if r.similarity is not None]
        judged = [r.edited for r in rows if r.edited is not None]
        edited = (f"{sum(judged)}/{len(judged)}" if judged else "-",) if result.edits else ()
        per_prompt.add_row(
            Text(printable(prompt)),
            str(len(rows)),
            str(sum(1 for r in rows if r.faces)),
            _fmt(sum(sims) / len(sims) if sims else None),
            f"{sum(r.recognised for r in rows)}/{len(rows)}",
            *edited,
        )
    console.print(per_prompt)
    summary = Table(title=Text(summary_title(result)))
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_column("what it means")
    summary.add_column("good")
    for row in summary_rows(result):
        summary.add_row(*row)
    console.print(summary)
    for note in result.notes:
        console.print(Text(f"note: {printable(note)}"))


def _by_prompt(images: Sequence[ImageScore]) -> dict[str, list[ImageScore]]:
    groups: dict[str, list[ImageScore]] = {}
    for score in images:
        groups.setdefault(score.prompt or "(no prompt)", []).append(score)
    return groups


def write_report(result: EvalResult, images: Sequence[Any], references: Sequence[Any], folder: Path) -> Path:
    """index.html with the summary, a grid of the scored images and the reference thumbnails; written whole
    into a temporary folder and renamed, so a crash never leaves half a report. Returns index.html's path."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not _is_report(folder):
        raise UsageError(f"--report {folder}: folder exists and is not an sdlora report; choose a new folder")
    with atomic_dir(folder) as tmp:
        (tmp / "images").mkdir()
        (tmp / "reference").mkdir()
        image_names = [f"images/{i:03d}.png" for i in range(len(images))]
        for name, image in zip(image_names, images, strict=True):
            image.save(tmp / name)
        ref_names = [f"reference/{i:03d}.jpg" for i in range(len(references))]
        for name, image in zip(ref_names, references, strict=True):
            thumb = image.convert("RGB")
            thumb.thumbnail((THUMB, THUMB))
            thumb.save(tmp / name, quality=90)
        (tmp / "result.json").write_text(result.to_json(), encoding="utf-8")
        (tmp / "index.html").write_text(render_html(result, image_names, ref_names), encoding="utf-8")
    return folder / "index.html"


def _is_report(folder: Path) -> bool:
    if (read_marker(folder) or {}).get("command") == "eval":
        return True  # a report folder `sdlora eval` claimed (its renders stream into it before index.html)
    index = folder / "index.html"
    return index.is_file() and REPORT_MARKER in index.read_text(encoding="utf-8", errors="replace")


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table.summary td, table.summary th { padding: 2px 10px; text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: 220px; font-size: 12px; border: 1px solid #ccc; padding: 6px; }
.card img { width: 100%; }
.ok { color: #080; } .no { color: #b00; }
.refs img { height: 96px; margin: 2px; }
"""


def render_html(result: EvalResult, image_names: Sequence[str], ref_names: Sequence[str]) -> str:
    esc = _esc
    rows = "".join(
        f"<tr><th>{key}</th>" + "".join(f"<td>{esc(text)}</td>" for text in texts) + "</tr>"
        for key, *texts in summary_rows(result)
    )
    head = "<tr><th>metric</th><th>value</th><th>what it means</th><th>good</th></tr>"
    cards = "".join(_card(score, name) for score, name in zip(result.images, image_names, strict=True))
    refs = "".join(f'<img src="{esc(name)}" alt="reference {i}">' for i, name in enumerate(ref_names))
    notes = "".join(f"<li>{esc(note)}</li>" for note in result.notes)
    title = f"sdlora eval: {esc(result.lora or 'images')}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{REPORT_MARKER}<title>{title}</title>'
        f"<style>{CSS}</style></head><body>\n<h1>{title}</h1>\n"
        f"<p>face model <b>{esc(result.face_model)}</b>: two faces are the same person under distance "
        f"{result.threshold:.3g}{', trigger <code>' + esc(result.trigger) + '</code>' if result.trigger else ''}.</p>\n"
        f'<h2>Summary</h2>\n<table class="summary">{head}{rows}</table>\n<ul>{notes}</ul>\n'
        f'<h2>Images</h2>\n<div class="grid">{cards}</div>\n'
        f'<h2>Reference set</h2>\n<div class="refs">{refs}</div>\n</body></html>\n'
    )


def _card(score: ImageScore, name: str) -> str:
    esc = _esc
    verdict = '<span class="ok">recognised</span>' if score.recognised else '<span class="no">not recognised</span>'
    lines = [
        esc(score.prompt or score.image),
        f"seed {score.seed}" if score.seed is not None else "",
        f"faces {score.faces} &middot; {verdict}",
        f"similarity {_fmt(score.similarity)} &middot; distance {_fmt(score.distance)}",
        f"other faces {score.other_faces}, matching {score.other_matches}" if score.other_faces else "",
        f"CLIP {_fmt(score.prompt_fidelity)}" if score.prompt_fidelity is not None else "",
        _edit_line(score),
    ]
    body = "<br>".join(line for line in lines if line)
    return f'<div class="card"><img src="{esc(name)}" alt="{esc(score.image)}"><div>{body}</div></div>'


def _edit_line(score: ImageScore) -> str:
    if score.edit is None:
        return ""
    asked = f"asked {_esc(score.edit)}: "
    if score.edited is None:
        return asked + "not judged"
    return asked + ('<span class="ok">edited</span>' if score.edited else '<span class="no">not edited</span>')

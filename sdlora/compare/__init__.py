"""`sdlora compare`: the same prompts and seeds through several routes to one person (a trained LoRA, keep-face
inpainting, zero-shot reference generation, the hosted edit API, or images made elsewhere), each scored like
`sdlora eval` against one reference set, ranked in one table with a contact sheet per route (report.html and
report.json in OUT).

Every route is parsed and checked (paths, LoRA files, bases, the API key, the reference photos' faces) before the
first image renders; a rendered route is `sdlora generate` into OUT/routes/LABEL, so its images carry the same
records as any generate's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora import fsutil
from sdlora.compare.report import (
    REPORT_HTML,
    REPORT_JSON,
    SCHEMA,
    CompareResult,
    RouteResult,
    contact_sheet,
    print_table,
    rank_key,
    render_html,
    write_sheet,
)
from sdlora.compare.routes import RENDERED, Route, check_route, parse_routes, render
from sdlora.config import Config
from sdlora.errors import UsageError, printable

__all__ = ["SCHEMA", "CompareResult", "compare"]

ROUTES, SHEETS, REFERENCE = "routes", "sheets", "reference"
THUMB = 160  # px, the reference thumbnails' longest side


def compare(
    config: Config,
    reference: Path | None,
    route_specs: list[str],
    out_dir: Path,
    *,
    prompts_file: Path | None = None,
    console: Any = None,
) -> CompareResult:
    """Render (or read) every route, score each against `reference`, write OUT/report.html + report.json."""
    from sdlora.evaluation.prompts import STANDARD_PROMPTS
    from sdlora.evaluation.run import face_backend, load_reference, reference_set
    from sdlora.generate import check_count, read_prompts

    routes = parse_routes(route_specs)
    if reference is None or not Path(reference).is_dir():
        raise UsageError(f"--reference {printable(reference)}: give the person's photos (a prep output folder)")
    templates = read_prompts(prompts_file) if prompts_file is not None else list(STANDARD_PROMPTS)
    if any(route.kind in RENDERED for route in routes):
        check_count(len(templates), config.eval.n)
    for route in routes:
        check_route(route, config)
    out_dir = Path(out_dir)
    _check_out(out_dir, [Path(reference), *(r.folder for r in routes if r.folder is not None)])
    backend = face_backend(config.eval.face_model)
    ref_images, ref_names = load_reference(reference)
    ref = reference_set(reference, backend, (ref_images, ref_names))  # no face in any photo: fails here
    with fsutil.lock(out_dir, "compare"):
        _start(out_dir)
        for route in routes:
            if route.kind in RENDERED:
                render(route, config, templates, out_dir / ROUTES / route.label)
        results = [_score(route, config, templates, ref, backend, out_dir) for route in routes]
        results.sort(key=lambda r: rank_key(r.summary), reverse=True)
        for rank, result in enumerate(results, 1):
            result.rank = rank
        result = CompareResult(
            face_model=backend.name,
            threshold=config.eval.threshold or backend.threshold,
            reference=ref_names,
            prompts=templates,
            n=config.eval.n,
            seed=config.eval.seed,
            routes=results,
            notes=[f"no face found in reference photo {name}" for name in ref.faceless],
        )
        _write(result, ref_images, out_dir)
    print_table(result, out_dir / REPORT_HTML, console)
    return result


def _check_out(out_dir: Path, inputs: list[Path]) -> None:
    """OUT is new, empty or an earlier compare's, and holds none of the inputs (nor sits in them)."""
    fsutil.check_own_or_empty(out_dir, "compare")
    root = out_dir.resolve()
    for path in inputs:
        where = path.resolve()
        if root == where or root in where.parents or where in root.parents:
            raise UsageError(f"--out {printable(out_dir)}: overlaps the input {printable(path)}; write elsewhere")


def _start(out_dir: Path) -> None:
    """Holding the lock: the marker, and no sheets or thumbnails of an earlier comparison (ours to remove)."""
    if fsutil.read_marker(out_dir) is None:
        fsutil.write_marker(out_dir, fsutil.new_marker("compare"))
    fsutil.remove_stale_temporaries(out_dir)
    for folder in (SHEETS, REFERENCE):
        for path in sorted((out_dir / folder).glob("*.jpg")):
            path.unlink()


def _score(route: Route, config: Config, templates: list[str], ref, backend, out_dir: Path) -> RouteResult:
    """The route's images scored like `eval --images`; CLIP reads rendered routes' prompts without the trigger."""
    from sdlora.evaluation.prompts import clip_text
    from sdlora.evaluation.run import score_folder

    assert route.folder is not None  # checked (folder) or rendered
    texts = [clip_text(t) for t in templates for _ in range(config.eval.n)] if route.kind in RENDERED else None
    summary, _scores, pictures, notes = score_folder(config, route.folder, ref, backend, texts)
    sheet = f"{SHEETS}/{route.label}.jpg"
    (out_dir / SHEETS).mkdir(exist_ok=True)
    write_sheet(contact_sheet(pictures, config.eval.n if route.kind in RENDERED else 8), out_dir / sheet)
    per_image = route.seconds / len(pictures) if route.seconds is not None else None
    return RouteResult(
        rank=0,
        label=route.label,
        kind=route.kind,
        spec=route.spec,
        base=route.base,
        folder=str(route.folder),
        sheet=sheet,
        seconds_per_image=per_image,
        summary=summary,
        notes=route.notes + notes,
    )


def _write(result: CompareResult, ref_images: list, out_dir: Path) -> None:
    """The reference thumbnails, then report.json and report.html (each written whole, then renamed)."""
    (out_dir / REFERENCE).mkdir(exist_ok=True)
    names = []
    for i, image in enumerate(ref_images):
        thumb = image.convert("RGB")
        thumb.thumbnail((THUMB, THUMB))
        names.append(f"{REFERENCE}/{i:03d}.jpg")
        write_sheet(thumb, out_dir / names[-1])
    text = result.model_dump_json(by_alias=True, indent=2) + "\n"
    fsutil.atomic_write_text(out_dir / REPORT_JSON, text)
    fsutil.atomic_write_text(out_dir / REPORT_HTML, render_html(result, names))

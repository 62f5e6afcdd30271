"""`sdlora compare`'s routes: what `--route [LABEL:]KIND=VALUE[,base=BASE][,model=MODEL]` means, every check that
can fail before anything renders, and how a route renders (by forwarding to `sdlora generate`)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.config import Config, GenerateConfig
from sdlora.errors import UsageError, printable

# What each kind of route is, and what its VALUE names.
KINDS = {
    "lora": "a trained LoRA: a train OUT_DIR or a .safetensors file, with :SCALE",
    "keepface": "keep-face inpainting on the base: the photo whose face is kept",
    "reference": "zero-shot reference generation on an edit base: a photo or a folder of them",
    "api": "the hosted image-edit API (generate --engine openai): a photo or a folder of them to upload",
    "folder": "images made elsewhere: a folder, scored as it is",
}
RENDERED = ("lora", "keepface", "reference", "api")
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Per-route settings after the value: `,base=...` (lora, keepface, reference), `,model=...` (api).
SETTING = re.compile(r",(base|model)=([^,]*)$")
# What {trigger} becomes in routes that know no trigger word (the photos show the person).
SUBJECT = "the person"


@dataclass
class Route:
    """One route of a comparison: its label (a folder name), kind, value and per-route settings."""

    label: str
    kind: str
    value: str
    spec: str
    base: str | None = None
    model: str | None = None
    folder: Path | None = None  # where its images are: the given folder, or OUT/routes/LABEL once rendered
    seconds: float | None = None  # wall time of its generate (model loading included)
    notes: list[str] = field(default_factory=list)


def parse_route(spec: str) -> Route:
    """'big:lora=runs/a:0.8,base=models/sd15' -> Route(label='big', kind='lora', value='runs/a:0.8', base=...)."""
    where = f"--route {printable(spec)}"
    head, sep, value = spec.partition("=")
    if not sep or not value:
        raise UsageError(f"{where}: write KIND=VALUE (KIND: {', '.join(KINDS)}), e.g. lora=runs/me")
    label, colon, kind = head.rpartition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise UsageError(f"{where}: unknown route kind {kind!r}; choose one of {', '.join(KINDS)}")
    settings: dict[str, str] = {}
    while match := SETTING.search(value):
        settings.setdefault(match.group(1), match.group(2))
        value = value[: match.start()]
    label = label if colon else kind
    if not LABEL.match(label):
        raise UsageError(f"{where}: the label {label!r} must be letters, digits, '.', '_' or '-' (a folder name)")
    if "base" in settings and kind not in ("lora", "keepface", "reference"):
        raise UsageError(f"{where}: ,base= applies to lora, keepface and reference routes")
    if "model" in settings and kind != "api":
        raise UsageError(f"{where}: ,model= applies to api routes (the API's model, e.g. gpt-image-1)")
    return Route(label, kind, value, spec, base=settings.get("base") or None, model=settings.get("model") or None)


def parse_routes(specs: list[str]) -> list[Route]:
    """Every --route, parsed; labels made unique (lora, lora-2, ...) unless given twice by the user."""
    if not specs:
        raise UsageError("give at least one --route KIND=VALUE (e.g. --route lora=runs/me --route folder=images/)")
    routes, seen = [], set()
    for spec in specs:
        route = parse_route(spec)
        if route.label in seen and route.label != route.kind:
            raise UsageError(f"--route {printable(spec)}: the label {route.label!r} is used twice; give another")
        label, number = route.label, 2
        while label in seen:
            label, number = f"{route.label}-{number}", number + 1
        route.label = label
        seen.add(label)
        routes.append(route)
    return routes


def check_route(route: Route, config: Config) -> None:
    """Everything about a route that can be checked without loading a model: paths, LoRA files, bases, the key."""
    from sdlora.lora.files import check_finite, parse_lora
    from sdlora.models import check_base

    where = f"--route {printable(route.spec)}"
    path = Path(route.value).expanduser()
    if route.kind == "folder":
        if not path.is_dir():
            raise UsageError(f"{where}: {printable(path)} is not a folder of images")
        route.folder = path
        return
    if route.kind == "lora":
        check_finite(parse_lora(route.value))
    elif not path.exists():
        raise UsageError(
            f"{where}: {printable(path)}: no such {'photo' if route.kind == 'keepface' else 'file or folder'}"
        )
    elif route.kind == "keepface":
        _check_keepface(path, where)
    if route.kind == "api":
        if not os.environ.get("OPENAI_API_KEY"):
            raise UsageError(f"{where}: OPENAI_API_KEY is not set; export your key, or drop the api route")
        return
    base = route.base or config.model.base
    if not base:
        raise UsageError(f"{where}: no base model; give --base MODEL, or ,base=MODEL after the route's value")
    check_base(base, config.model.allow_pickle, config.model.single_file_config, hub=False)
    route.base = base


def _check_keepface(path: Path, where: str) -> None:
    """One photo in which dlib finds the face keep-face keeps (generate checks it too, but only at its turn)."""
    from sdlora.faces.dlib import DlibFaces
    from sdlora.generate.keepface import load_photo

    if not path.is_file():
        raise UsageError(f"{where}: give one photo for keep-face (its face is kept), not a folder")
    if not DlibFaces().detect(load_photo(path, "--keep-face")):
        raise UsageError(
            f"{where}: no face found in {printable(path)} (dlib finds the face keep-face keeps); use a photo with a "
            "clear, roughly frontal face at least ~80 px wide"
        )


def route_config(route: Route, config: Config, prompts: list[str]) -> tuple[Config, str]:
    """The generate config that renders `route` (the comparison's prompts, n = eval.n, seeds from eval.seed; the
    [generate] section's sampling settings) and its engine."""
    g = config.generate.model_dump(exclude_unset=True)
    for key in ("loras", "keep_face", "init_image", "reference", "compare", "refiner"):
        g.pop(key, None)
    g.update(prompts=prompts, n=config.eval.n, seed=config.eval.seed)
    if route.kind == "lora":
        g["loras"] = [route.value]
    elif route.kind == "keepface":
        g["keep_face"] = route.value
    else:
        g["reference"] = [route.value]
    if route.model:
        g["api_model"] = route.model
    # The model section as given (its unset settings stay unset: a family's own defaults still apply), with the
    # route's base.
    model = config.model if route.kind == "api" else config.model.model_copy(update={"base": route.base})
    update = {"generate": GenerateConfig.model_validate(g), "model": model}
    return config.model_copy(update=update), "openai" if route.kind == "api" else "local"


def route_prompts(route: Route, templates: list[str], config: Config) -> list[str]:
    """The prompts with {trigger} filled: the LoRA's trigger phrase (or [prep]'s token and class word when its file
    has none, as eval does), or SUBJECT for the routes that see the person in photos."""
    if route.kind != "lora":
        return [t.replace("{trigger}", SUBJECT) for t in templates]
    from sdlora.lora.files import parse_lora

    trigger = parse_lora(route.value).trigger
    if trigger is None:
        trigger = f"{config.prep.token} {config.prep.class_word}"
        route.notes.append(f"the LoRA has no trigger phrase in its metadata; used {trigger!r} from [prep]")
    return [t.replace("{trigger}", trigger) for t in templates]


def render(route: Route, config: Config, templates: list[str], folder: Path) -> None:
    """Render the route into `folder` with `sdlora generate` (its images, records and grid), timed."""
    from sdlora.generate import generate

    route_cfg, engine = route_config(route, config, route_prompts(route, templates, config))
    started = time.perf_counter()
    written = generate(route_cfg, folder, overwrite=True, engine=engine)
    route.seconds = time.perf_counter() - started
    route.folder = folder
    if not written:
        raise UsageError(f"--route {printable(route.spec)}: generate wrote no images")

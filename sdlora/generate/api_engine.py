"""`sdlora generate --engine openai`: images from a hosted, OpenAI-compatible image-edit API (POST /images/edits)
instead of a local model, written like every generate's (PNG + record, config.json, grid).

Nothing leaves the machine unless the user passed `--engine` (an argument of `generate`, never a config setting,
so no TOML file can switch uploads on). The key is read from OPENAI_API_KEY by the caller and never written.
The photos are re-encoded as PNG before the upload, so their EXIF (GPS, camera serial numbers) stays home.

The client is httpx (sdlora[api]): the API is one multipart POST, and with httpx every failure the user must hear
about (a refused request, 401, 429 with its Retry-After, a malformed answer) is a status code and a JSON body read
here, in one place, without the official SDK's automatic retries and lenient response models.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sdlora import __version__, fsutil, layout
from sdlora.config import Config
from sdlora.errors import Interrupted, SdloraError, UsageError, printable
from sdlora.generate import pngmeta
from sdlora.generate.output import Job, Writer, check_out_dir

log = logging.getLogger(__name__)

ENGINES = ("local", "openai")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_REFERENCES = 16  # gpt-image-1 takes up to 16 input images
MAX_PER_REQUEST = 10  # the API's largest n
TIMEOUT_S = 300.0  # one edit can take a minute or two at high quality
# Generate settings the edit endpoint has no field for: set, they are ignored (said once, as a warning).
IGNORED = ("negative", "steps", "cfg", "scheduler", "seed", "batch_size", "fuse", "save_steps", "strength")
# Settings that need a local model: with --engine openai they are a usage error, not silently dropped.
LOCAL_ONLY = {"loras": "--lora", "keep_face": "--keep-face", "init_image": "--init-image", "refiner": "--refiner"}
# What OpenAI's error body says when its safety system refused the request.
REFUSALS = ("moderation_blocked", "content_policy_violation", "content_filter", "image_generation_user_error")


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to send: the base URL ending in /v1, the key, and the model."""

    base_url: str
    key: str
    model: str

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/images/edits"


def endpoint(config: Config, key: str | None, env_base_url: str | None) -> Endpoint:
    """The endpoint of `--engine openai`, checked before anything is read or sent: a key, an http(s) URL."""
    if not key:
        raise UsageError(
            "--engine openai: OPENAI_API_KEY is not set; export your key (or a compatible server's) and run again"
        )
    base_url = config.generate.api_base_url or env_base_url or DEFAULT_BASE_URL
    if not base_url.startswith(("https://", "http://")):
        raise UsageError(f"generate.api_base_url {printable(base_url)}: give an http(s) URL, e.g. {DEFAULT_BASE_URL}")
    return Endpoint(base_url, key, config.generate.api_model)


def check_settings(config: Config) -> None:
    """Refuse what needs a local model; warn once about the settings the API ignores."""
    g = config.generate
    if not g.prompts:
        raise UsageError("no prompt: give --prompt TEXT or --prompts FILE")
    if not g.reference:
        raise UsageError("--engine openai needs --reference PHOTO (repeat) or a folder: the photos the API edits")
    for key, option in LOCAL_ONLY.items():
        if getattr(g, key):
            raise UsageError(f"{option} needs a local model; drop it or drop --engine openai")
    if g.compare:
        raise UsageError("--compare shows a LoRA beside its base model; it has no meaning with --engine openai")
    ignored = [key for key in IGNORED if key in g.model_fields_set]
    if ignored:
        log.warning("--engine openai ignores %s (the edit endpoint has no such fields)", ", ".join(ignored))


def reference_photos(paths: list[Path], limit: int = 3) -> list[Path]:
    """The photos to send: the photos given (at most MAX_REFERENCES), or a prepped dataset's `limit` best faces
    (the same choice as `generate --reference` on an edit model), or the first `limit` photos of a plain folder."""
    from sdlora.generate.references import best_faces

    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if (folder / layout.MANIFEST).is_file():
            return best_faces(folder, limit)
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in layout.IMAGE_SUFFIXES and p.is_file())
        if not photos:
            raise UsageError(f"--reference {printable(folder)}: no images in it; give photos or a folder of photos")
        return photos[:limit]
    if len(paths) > MAX_REFERENCES:
        raise UsageError(f"--reference: {len(paths)} photos given; the edit endpoint takes at most {MAX_REFERENCES}")
    for path in paths:
        if not path.is_file():
            what = "a folder goes alone (its first photos are sent)" if path.is_dir() else "no such file"
            raise UsageError(f"--reference {printable(path)}: {what}")
    return paths


def encode_photo(path: Path) -> bytes:
    """The photo as PNG bytes: upright, RGB, without its EXIF (location, camera) or other metadata."""
    from sdlora.prep.images import read_image

    buffer = io.BytesIO()
    read_image(path, "--reference").save(buffer, format="PNG")
    return buffer.getvalue()


def generate(
    config: Config, out_dir: Path, key: str | None, env_base_url: str | None = None, overwrite: bool = False
) -> list[Path]:
    """Every prompt n times through the edit endpoint (up to MAX_PER_REQUEST images a request); each image is
    written as soon as its answer arrives (Ctrl-C keeps them). All checks (key, settings, photos, output folder)
    come before the first byte is sent; `overwrite` as generate's."""
    check_settings(config)
    where = endpoint(config, key, env_base_url)
    g = config.generate
    photos = reference_photos(g.reference)
    uploads = [(path, encode_photo(path)) for path in photos]
    out_dir = Path(out_dir)
    check_out_dir(out_dir, list(g.reference), 1024 * 1024 * 3)
    writer = Writer(out_dir, config, [], overwrite)
    references = [{"path": str(path), "sha256": hashlib.sha256(data).hexdigest()} for path, data in uploads]
    try:
        import httpx
    except ImportError:
        raise UsageError("--engine openai needs httpx: pip install 'sdlora[api]'") from None
    try:
        with fsutil.lock(out_dir, "generate"), httpx.Client(timeout=TIMEOUT_S) as client:
            writer.start()
            writer.write_config()
            writer.plan_sheets(len(g.prompts) * g.n, (1024, 1024), False)
            for prompt in g.prompts:
                wanted = g.n
                while wanted:
                    done = len(writer.written)
                    started = time.perf_counter()
                    images, revised = _request(client, where, prompt, min(MAX_PER_REQUEST, wanted), uploads, g, done)
                    seconds = (time.perf_counter() - started) / len(images)
                    for image, revised_prompt in list(zip(images, revised, strict=True))[:wanted]:
                        job = Job(writer.first + len(writer.written), prompt, g.seed + len(writer.written))
                        data = record(config, job, image.size, references, revised_prompt, seconds)
                        _write(writer, job, image, data)
                        wanted -= 1
            writer.sheets()
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: kept the {len(writer.written)} image(s) finished so far in {out_dir}", signal.SIGINT
        ) from None
    return writer.written


def record(
    config: Config,
    job: Job,
    size: tuple[int, int],
    references: list[dict[str, str]],
    revised_prompt: str | None,
    seconds: float,
) -> dict[str, Any]:
    """What made one API image: the prompt, model, server, the photos sent (by hash), A1111-style parameters. The
    seed in the file name only numbers the image: the API takes no seed, so an image can't be remade."""
    g = config.generate
    settings = {
        "Engine": "openai",
        "Model": g.api_model,
        "Size": f"{size[0]}x{size[1]}",
        "Requested size": g.size if "size" in g.model_fields_set else None,
        "Version": f"sdlora {__version__}",
    }
    return {
        "prompt": job.prompt,
        "index": job.index,
        "seed": None,
        "engine": "openai",
        "api_model": g.api_model,
        "api_base_url": g.api_base_url,
        "width": size[0],
        "height": size[1],
        "references": references,
        "revised_prompt": revised_prompt,
        "seconds": round(seconds, 3),
        "ignored": [key for key in IGNORED if key in g.model_fields_set],
        "sdlora_version": __version__,
        "parameters": pngmeta.infotext(job.prompt, "", settings),
    }


def _write(writer: Writer, job: Job, image: Image.Image, data: dict[str, Any]) -> None:
    stem = layout.generated_stem(job.index, job.seed)
    pngmeta.save_png(writer.out_dir / f"{stem}.png", image, data["parameters"], replace=False)
    pngmeta.save_json(writer.out_dir / f"{stem}.json", data, replace=False)
    writer.written.append(writer.out_dir / f"{stem}.png")
    if writer.grid is not None:
        writer.grid.add(image)


def _request(
    client: Any, where: Endpoint, prompt: str, count: int, uploads: list[tuple[Path, bytes]], g: Any, done: int
) -> tuple[list[Image.Image], list[str | None]]:
    """One POST /images/edits (multipart: image[] per photo, prompt, model, n, size when set) -> the images."""
    import httpx

    fields = {"prompt": prompt, "model": where.model, "n": str(count)}
    if "size" in g.model_fields_set:
        fields["size"] = g.size
    if where.model.startswith("dall-e"):  # DALL-E answers with URLs unless asked; gpt-image-1 refuses the field
        fields["response_format"] = "b64_json"
    files = [("image[]", (f"reference-{i}.png", data, "image/png")) for i, (_, data) in enumerate(uploads)]
    kept = f" (kept the {done} image(s) written before)" if done else ""
    try:
        response = client.post(where.url, data=fields, files=files, headers={"Authorization": f"Bearer {where.key}"})
    except httpx.HTTPError as exc:
        raise SdloraError(f"--engine openai: could not reach {where.url} ({type(exc).__name__}: {exc}){kept}") from None
    if response.status_code != 200:
        raise SdloraError(http_error(response, where) + kept)
    return parse_images(response, where.url, kept)


def http_error(response: Any, where: Endpoint) -> str:
    """One line for a refused request: what the server said and what to do."""
    status = response.status_code
    try:
        error = response.json().get("error") or {}
        message, code = str(error.get("message") or "").strip(), str(error.get("code") or error.get("type") or "")
    except (ValueError, AttributeError):
        message, code = "", ""
    said = f": {printable(message.splitlines()[0])[:300]}" if message else ""
    if status == 401:
        return f"--engine openai: {where.base_url} refused the key (401 unauthorized{said}); check OPENAI_API_KEY"
    if status == 429:
        after = response.headers.get("retry-after")
        wait = f"; the server asks to retry after {after} s" if after else "; wait a minute and retry"
        quota = "; your quota is used up: check your plan and billing" if code == "insufficient_quota" else ""
        return f"--engine openai: rate limited (429{said}){wait}{quota}"
    if code in REFUSALS or "safety system" in message.lower():
        refused = f"the request was refused by the content policy ({code or status}{said})"
        return f"--engine openai: {refused}; change the prompt or the photos"
    return f"--engine openai: {where.url} answered HTTP {status}{said}"


def parse_images(response: Any, url: str, kept: str = "") -> tuple[list[Image.Image], list[str | None]]:
    """data[].b64_json of the answer, decoded and checked to be images; anything else is a malformed response."""
    bad = f"--engine openai: malformed response from {url}"
    try:
        items = response.json()["data"]
        if not isinstance(items, list) or not items:
            raise TypeError("no images in data")
        images, revised = [], []
        for item in items:
            raw = base64.b64decode(item["b64_json"], validate=True)
            with Image.open(io.BytesIO(raw)) as image:
                images.append(image.convert("RGB"))
            revised.append(item.get("revised_prompt"))
    except (ValueError, KeyError, TypeError, AttributeError, OSError, binascii.Error) as exc:
        reason = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]
        raise SdloraError(f"{bad} ({reason}; expected JSON with data[].b64_json images){kept}") from None
    return images, revised

"""The web app's workspace: its folders, and the one check that every path it reads, writes or serves is inside.

WORKSPACE holds photos/, datasets/, runs/, images/ and models/ (local base models), plus the app's own state in
.sdlora-serve/ (job records and logs, the upload cache). Base models may also live in a read-only folder outside
it (`--models DIR`): read, never written, and checked like the workspace (a link in it must stay in it).
Names typed in the page or carried by uploads never become paths directly: they are sanitised, and every path
is resolved (symlinks followed) and must stay inside.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sdlora import layout
from sdlora.errors import UsageError

FOLDERS = ("photos", "datasets", "runs", "images", "models")
STATE = ".sdlora-serve"
# What an upload may be: the photo formats prep reads (README), nothing executable or archived.
PHOTO_SUFFIXES = layout.IMAGE_SUFFIXES  # what prep reads
CAPTION_SUFFIXES = frozenset({".txt"})
MAX_UPLOAD_BYTES = 50 * 2**20  # a 12-MP phone JPEG is 3-8 MB; 50 MB leaves room for HEIC/TIFF scans
MAX_UPLOAD_FILES = 500
_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def sanitise_name(name: str, fallback: str = "untitled") -> str:
    """A safe file or folder name: the last path part only, [A-Za-z0-9._-], no leading dots, at most 100 chars."""
    base = re.split(r"[\\/]", str(name))[-1]
    cleaned = _NAME.sub("-", base).strip("-")
    cleaned = cleaned.lstrip(".")[:100]
    return cleaned or fallback


@dataclass(frozen=True)
class Workspace:
    root: Path
    models: Path | None = None  # the read-only models folder given with --models, resolved

    @classmethod
    def open(cls, root: Path, models: Path | None = None) -> Workspace:
        """The workspace at `root` (created with its folders if missing), with an optional read-only `models`
        folder of base models outside it."""
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise UsageError(f"WORKSPACE {root}: is a file; give a folder")
        if models is not None and not Path(models).expanduser().is_dir():
            raise UsageError(f"--models {models}: no such folder; give the folder that holds your base models")
        root.mkdir(parents=True, exist_ok=True)
        workspace = cls(root.resolve(), Path(models).expanduser().resolve() if models is not None else None)
        for name in (*FOLDERS, STATE):
            (workspace.root / name).mkdir(exist_ok=True)
        return workspace

    @property
    def state(self) -> Path:
        return self.root / STATE

    def path(self, relative: str | Path, under: str | None = None) -> Path:
        """`relative` (a path typed or chosen in the page) resolved inside the workspace, or inside its folder
        `under`. Absolute paths, `..` and symlinks that lead out are refused with a one-line UsageError."""
        return self.inside(self._joined(relative, under), under)

    def _joined(self, relative: str | Path, under: str | None = None) -> Path:
        """`relative` joined to the workspace (or `under`), not yet resolved: absolute paths and `..` refused."""
        text = str(relative).strip()
        if not text:
            raise UsageError("no path given")
        if "\x00" in text:
            raise UsageError(f"{text!r}: not a valid path")
        parts = Path(text)
        if parts.is_absolute() or text.startswith("~"):
            raise UsageError(f"{text}: absolute paths are refused; give a path inside the workspace")
        if ".." in parts.parts:
            raise UsageError(f"{text}: '..' is refused; give a path inside the workspace")
        return (self.root / under if under else self.root) / parts

    def inside(self, path: Path, under: str | None = None) -> Path:
        """`path` (absolute) with symlinks resolved, if it lies inside the workspace (or its folder `under`)."""
        top = (self.root / under).resolve() if under else self.root
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise UsageError(f"{path}: can't be resolved (a link loop?); refused") from None
        if resolved != top and top not in resolved.parents:
            where = f"{under}/ in the workspace" if under else "the workspace"
            raise UsageError(f"{path}: leads outside {where}; refused")
        return resolved

    def within(self, paths: Iterable[Path], under: str | None = None) -> list[Path]:
        """The `paths` that resolve inside the workspace (or its folder `under`), resolved; the others (symlinks
        that lead out) are left out. What the page shows or offers for download goes through here."""
        kept = []
        for path in paths:
            try:
                kept.append(self.inside(path, under))
            except (UsageError, OSError, RuntimeError):  # RuntimeError: a symlink loop on older Pythons
                continue
        return kept

    def relative(self, path: Path) -> str:
        """The workspace-relative form of a path inside it (how the page names files)."""
        return self.inside(path).relative_to(self.root).as_posix()

    def new_folder(self, under: str, name: str) -> Path:
        """A fresh, not yet existing folder `under/NAME` with NAME sanitised; an existing one is an error."""
        folder = self.path(sanitise_name(name), under)
        if folder.exists():
            raise UsageError(f"{under}/{folder.name} already exists; choose another name")
        return folder

    def subfolders(self, under: str) -> list[str]:
        """Names of the folders directly in `under/` (hidden ones and symlinks out left out)."""
        top = self.root / under
        names = []
        for entry in sorted(top.iterdir()) if top.is_dir() else []:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                self.inside(entry, under)
            except UsageError:
                continue
            names.append(entry.name)
        return names

    def base_models(self) -> list[str]:
        """Local base models: folders and .safetensors files in models/ (workspace-relative) and in the --models
        folder (absolute). Links are followed and kept only where they lead into one of the two."""
        found = []
        for top, shown in ((self.root / "models", lambda p: f"models/{p.name}"), (self.models, str)):
            for entry in sorted(top.iterdir()) if top is not None else []:  # models/ gone: a one-line error
                if entry.name.startswith(".") or not (entry.is_dir() or entry.suffix == ".safetensors"):
                    continue
                try:
                    self.model_path(entry)
                except UsageError:
                    continue
                found.append(shown(entry))
        return found

    def model_path(self, path: Path) -> Path:
        """`path` (absolute) with links resolved, if it lies inside the workspace or the --models folder."""
        try:
            return self.inside(path)
        except UsageError:
            if self.models is None:
                raise
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):
            raise UsageError(f"{path}: can't be resolved (a link loop?); refused") from None
        if resolved != self.models and self.models not in resolved.parents:
            raise UsageError(f"{path}: leads outside the workspace and the --models folder {self.models}; refused")
        return resolved

    def model_ref(self, value: str) -> str:
        """A base-model choice as `sdlora` takes it: an absolute path for a file or folder in the workspace or the
        --models folder, the id itself for a hub id (owner/name) that names no workspace path. A typo under a
        workspace folder (models/toy-bse) is an error now, not a hub id that fails a minute later."""
        text = value.strip()
        if not text:
            raise UsageError("choose a base model: a folder or file under models/, or a hub id such as owner/name")
        first = text.split("/", 1)[0]
        if _HUB_ID.match(text) and first not in (*FOLDERS, STATE) and not (self.root / text).exists():
            return text
        if self.models is not None and Path(text).is_absolute():
            path = self.model_path(Path(text))
        else:
            path = self.model_path(self._joined(text))
        if not path.exists():
            where = "models/" + (f" or {self.models}" if self.models is not None else "")
            raise UsageError(f"{text}: no such model (put it under {where}; a hub id is owner/name)")
        return str(path)

    def take_upload(
        self, source: Path, folder: Path, allowed: frozenset[str], original_name: str | None = None
    ) -> Path:
        """Copy one uploaded file into `folder` (inside the workspace) under a sanitised name, after checking its
        type and size. The upload's own name is never trusted as a path."""
        source = Path(source)
        name = sanitise_name(original_name or source.name, fallback="upload")
        suffix = Path(name).suffix.lower()
        if suffix not in allowed:
            kinds = ", ".join(sorted(allowed))
            raise UsageError(f"{name}: not an accepted file type (accepted: {kinds})")
        size = source.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise UsageError(f"{name}: {size / 2**20:.0f} MB is over the {MAX_UPLOAD_BYTES // 2**20} MB upload limit")
        folder = self.inside(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = self.inside(folder / name)
        stem, number = target.stem, 1
        while target.exists():  # two uploads with one name: keep both
            target = folder / f"{stem}-{number}{suffix}"
            number += 1
        shutil.copyfile(source, target)
        return target

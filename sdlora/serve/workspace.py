"""The web app's workspace: its folders, and the one check that every path it reads, writes or serves is inside.

WORKSPACE holds photos/, datasets/, runs/, images/ and models/ (local base models), plus the app's own state in
.sdlora-serve/ (job records and logs, the upload cache). Names typed in the page or carried by uploads never
become paths directly: they are sanitised, and every path is resolved (symlinks followed) and must stay inside.
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

    @classmethod
    def open(cls, root: Path) -> Workspace:
        """The workspace at `root` (created with its folders if missing)."""
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise UsageError(f"WORKSPACE {root}: is a file; give a folder")
        root.mkdir(parents=True, exist_ok=True)
        workspace = cls(root.resolve())
        for name in (*FOLDERS, STATE):
            (workspace.root / name).mkdir(exist_ok=True)
        return workspace

    @property
    def state(self) -> Path:
        return self.root / STATE

    def path(self, relative: str | Path, under: str | None = None) -> Path:
        """`relative` (a path typed or chosen in the page) resolved inside the workspace, or inside its folder
        `under`. Absolute paths, `..` and symlinks that lead out are refused with a one-line UsageError."""
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
        top = self.root / under if under else self.root
        return self.inside(top / parts, under)

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
        """Local base models: folders and .safetensors files in models/ (workspace-relative)."""
        top = self.root / "models"
        found = []
        for entry in sorted(top.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() or entry.suffix == ".safetensors":
                try:
                    found.append(self.relative(self.inside(entry, "models")))
                except UsageError:
                    continue
        return found

    def model_ref(self, value: str) -> str:
        """A base-model choice as `sdlora` takes it: an absolute path for a file or folder in the workspace,
        the id itself for a hub id (owner/name) that names no workspace path."""
        text = value.strip()
        if not text:
            raise UsageError("choose a base model: a folder or file under models/, or a hub id such as owner/name")
        if _HUB_ID.match(text) and not (self.root / text).exists():
            return text
        path = self.path(text)
        if not path.exists():
            raise UsageError(f"{text}: no such model in the workspace (put it under models/) and not a hub id")
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

"""Resumable base builds: the trained VAE, then the denoiser's whole state every few minutes, beside the output.

A build cut short (by --max-seconds, a kill, a crash) loses at most the steps since the last save, and running the
same command again continues from there, to the same weights an uninterrupted build gives (a test checks it).
`<out>.progress/` holds:
- vae/ (a diffusers folder) and vae.json (the torch RNG state once the VAE is trained, and the spec);
- denoiser.safetensors: UNet + text encoder, their moving average, AdamW's state, both RNG states, the step and the
  spec, in one file so that it is replaced in one rename.
The folder is removed once the base is written whole.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

SAVE_SECONDS = 600.0  # a CPU build saves every 10 minutes (a GPU one rarely gets that far)
DENOISER = "denoiser.safetensors"


def folder_for(out: Path) -> Path:
    return out.parent / f"{out.name}.progress"


class Progress:
    """The saved state of one build; `folder=None` saves nothing (continuations, tests that do not resume)."""

    def __init__(self, folder: Path | None, spec: dict[str, Any], log=print, save_seconds: float = SAVE_SECONDS):
        self.folder, self.log, self.save_seconds = folder, log, save_seconds
        self.spec = json.loads(json.dumps(spec))  # as it reads back (tuples become lists)
        self.saved_at = time.time()

    def _check_spec(self, found: dict[str, Any], where: Path) -> None:
        if found != self.spec:
            raise SystemExit(f"error: {where}: saved by a build of another spec; remove it or choose another --out")

    def load_vae(self):
        """The VAE a cut build trained (and the torch RNG as it was then), or None."""
        if self.folder is None or not (self.folder / "vae.json").is_file():
            return None
        record = json.loads((self.folder / "vae.json").read_text())
        self._check_spec(record["spec"], self.folder)
        import torch
        from diffusers import AutoencoderKL

        torch.set_rng_state(torch.tensor(record["torch_rng"], dtype=torch.uint8))
        self.log(f"vae: the one trained before, from {self.folder}")
        return AutoencoderKL.from_pretrained(self.folder / "vae").eval().requires_grad_(False)

    def save_vae(self, vae) -> None:
        import torch

        from sdlora.fsutil import atomic_dir, atomic_write_text

        if self.folder is None:
            return
        with atomic_dir(self.folder / "vae") as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        record = {"spec": self.spec, "torch_rng": torch.get_rng_state().tolist()}
        atomic_write_text(self.folder / "vae.json", json.dumps(record))
        self.saved_at = time.time()

    def load_denoiser(self, modules, averaged, optimizer, rng) -> int:
        """Restore the last saved denoiser state into the given objects; the step to start from (0: none saved)."""
        import torch
        from safetensors import safe_open

        if self.folder is None or not (self.folder / DENOISER).is_file():
            return 0
        with safe_open(str(self.folder / DENOISER), "pt") as handle:
            meta = json.loads(handle.metadata()["state"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
        self._check_spec(meta["spec"], self.folder)
        modules.load_state_dict(_part(tensors, "model."))
        if averaged is not None:
            averaged.load_state_dict(_part(tensors, "ema."))
        state: dict[int, dict[str, Any]] = {}
        for key, value in _part(tensors, "opt.").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["torch_rng"])
        version, internal, gauss = meta["rng"]
        rng.setstate((version, tuple(internal), gauss))
        self.log(f"unet: continuing from step {meta['step']} ({self.folder / DENOISER})")
        return int(meta["step"])

    def save_denoiser(self, step: int, modules, averaged, optimizer, rng, force: bool = False) -> None:
        """Save the state before step `step` when the save interval has passed (or `force`)."""
        import torch
        from safetensors.torch import save_file

        from sdlora.fsutil import atomic_path

        if self.folder is None or not (force or time.time() - self.saved_at >= self.save_seconds):
            return
        tensors = {f"model.{k}": v for k, v in modules.state_dict().items()}
        if averaged is not None:
            tensors |= {f"ema.{k}": v for k, v in averaged.state_dict().items()}
        saved = optimizer.state_dict()
        for index, values in saved["state"].items():
            tensors |= {f"opt.{index}.{name}": value for name, value in values.items()}
        tensors["torch_rng"] = torch.get_rng_state()
        meta = {"step": step, "spec": self.spec, "rng": rng.getstate(), "param_groups": saved["param_groups"]}
        tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / DENOISER) as tmp:
            save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        self.saved_at = time.time()
        self.log(f"unet: state saved before step {step} ({self.folder / DENOISER})")

    def clear(self) -> None:
        """Remove what this module wrote (only that), then the folder when it is left empty."""
        if self.folder is None or not self.folder.is_dir():
            return
        shutil.rmtree(self.folder / "vae", ignore_errors=True)
        for name in ("vae.json", DENOISER):
            (self.folder / name).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            self.log(f"left {self.folder}: it holds files this build did not write")


def _part(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

"""LoRA files for generation: `PATH[:SCALE]` specs, metadata (trigger, family), family checks, A1111 hashes, loading."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora import families, layout
from sdlora.errors import SdloraError, UsageError

if TYPE_CHECKING:
    from sdlora.families import Family

DIFFUSERS_WEIGHTS = layout.DIFFUSERS_LORA  # what `train` and diffusers' scripts write in OUT_DIR


@dataclass(frozen=True)
class Lora:
    """One `--lora` argument, resolved: the .safetensors file, its scale and its header metadata."""

    path: Path
    scale: float
    name: str  # A1111's name for it: the OUT_DIR or file name without suffix
    metadata: dict[str, str] = field(default_factory=dict)
    a1111_file: Path | None = None  # the kohya file A1111 knows it by, when `path` is a train OUT_DIR's diffusers file

    @property
    def trigger(self) -> str | None:
        return trigger_phrase(self.metadata)

    @property
    def family(self) -> str | None:
        """The family name its metadata says it was made for (sdlora.families.detect_lora)."""
        return families.detect_lora(self.metadata)


def parse_lora(spec: str) -> Lora:
    """'out/run:0.8' -> Lora(path=out/run/pytorch_lora_weights.safetensors, scale=0.8); the scale defaults to 1.
    A ':' is part of the path when the whole spec names something that exists (C:\\..., odd folder names);
    otherwise what follows the last ':' must be a finite number. A train OUT_DIR is known to A1111 by its
    kohya file, so its name (the `<lora:NAME:w>` tag) and A1111 hash come from that file."""
    import math

    from sdlora.errors import printable
    from sdlora.models import check_safetensors

    path_text, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).expanduser().exists() and not any(c in tail for c in "/\\"):
        try:
            scale = float(tail)
        except ValueError:
            raise UsageError(
                f"--lora {printable(spec)}: the scale {printable(tail)!r} after ':' is not a number; "
                "write PATH:SCALE, e.g. out/run:0.8"
            ) from None
        if not math.isfinite(scale):
            raise UsageError(f"--lora {printable(spec)}: the scale must be a finite number, e.g. 0.8 (got {tail})")
        path_text = head
    given = Path(path_text).expanduser()
    path = resolve_lora_file(given, spec)
    header = check_safetensors(path, f"--lora {path}")
    if not any(key != "__metadata__" for key in header):
        raise UsageError(f"--lora {printable(path)}: the file holds no tensors (an empty LoRA); train it again")
    kohya = _kohya_file_of(given) if given.is_dir() else None
    name = kohya.stem if kohya else given.name if given.is_dir() else given.stem
    return Lora(path=path, scale=scale, name=name, metadata=read_metadata(path), a1111_file=kohya)


def _kohya_file_of(folder: Path) -> Path | None:
    """The kohya-format file of a train OUT_DIR (`train.name` in its config.json, default the folder's name):
    what the user copies into A1111/Forge/ComfyUI, and what civitai knows by its hash."""
    names = [folder.resolve().name]
    try:
        name = json.loads((folder / layout.CONFIG_JSON).read_text(encoding="utf-8")).get("train", {}).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and name:
        names.insert(0, name)
    for name in names:
        candidate = folder / layout.kohya_file(name)
        if candidate.is_file() and candidate.name != DIFFUSERS_WEIGHTS:
            return candidate
    others = [p for p in folder.glob("*.safetensors") if p.name != DIFFUSERS_WEIGHTS and p.is_file()]
    return others[0] if len(others) == 1 else None


def resolve_lora_file(path: Path, spec: str) -> Path:
    if not path.exists():
        raise UsageError(f"--lora {spec}: no such file or folder")
    if path.is_dir():
        if (path / DIFFUSERS_WEIGHTS).is_file():
            return path / DIFFUSERS_WEIGHTS
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise UsageError(
                f"--lora {spec}: expected {DIFFUSERS_WEIGHTS} or exactly one .safetensors file in the folder "
                f"(found {len(files)}); pass the file itself"
            )
        return files[0]
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"--lora {spec}: only .safetensors LoRA files are read (other formats are pickles)")
    return path


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"--lora {path}: not a readable .safetensors file ({exc})") from None


def trigger_phrase(metadata: dict[str, str]) -> str | None:
    """Ours (`sdlora.trigger_phrase`), else modelspec's, else kohya's most frequent caption tag."""
    for key in ("sdlora.trigger_phrase", "modelspec.trigger_phrase"):
        if metadata.get(key, "").strip():
            return metadata[key].strip()
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return None
    counts: Counter[str] = Counter()
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        if isinstance(tags, dict):
            counts.update({str(tag).strip(): int(n) for tag, n in tags.items()})
    return counts.most_common(1)[0][0] if counts else None


def check_family(lora: Lora, family: Family, pipe: Any) -> None:
    """Refuse a LoRA made for another base family, by its metadata, else by its tensor shapes or key names."""
    made_for = lora.family
    if made_for is not None and made_for != family.name:
        raise UsageError(
            f"--lora {lora.path}: made for {made_for}, but the base model is {family.name}; "
            f"use a {family.name} LoRA or a {made_for} base model"
        )
    base_dims = family.cross_attention_widths(pipe)
    in_features, two_encoders = _shape_facts(lora.path)
    wrong = in_features - base_dims
    if wrong:
        width = sorted(wrong)[0]
        by_width = {f.text_width: f.name for f in families.REGISTRY.values()}
        made_for = by_width.get(width, f"a model with {width}-wide text features")
        raise UsageError(
            f"--lora {lora.path}: its cross-attention layers take {width}-wide text features ({made_for}), "
            f"but the base model ({family.name}) has {sorted(base_dims)[0]}; use a LoRA made for {family.name}"
        )
    if two_encoders and len(family.text_encoders) < 2:
        raise UsageError(
            f"--lora {lora.path}: has two text encoders' keys (lora_te1_/lora_te2_: SDXL), but the base model "
            f"is {family.name}; use a LoRA made for {family.name}"
        )


def _shape_facts(path: Path) -> tuple[set[int], bool]:
    """In-features of the LoRA's cross-attention to_k down-projections, and whether it has two text encoders'
    keys (kohya's te1/te2)."""
    from safetensors import safe_open

    in_features: set[int] = set()
    sgm_te = False
    lokr_inputs: dict[str, dict[int, int]] = {}  # LoKr module -> {factor: its in-features}: in = in1 * in2
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            sgm_te = sgm_te or key.startswith(("lora_te1_", "lora_te2_"))
            module, _, part = key.rpartition(".lokr_")
            if "attn2" in module and "to_k" in module and part in ("w1", "w1_b", "w2", "w2_b"):
                lokr_inputs.setdefault(module, {})[int(part[1])] = int(handle.get_slice(key).get_shape()[1])
            down = any(part in key for part in ("lora_A.", "lora_down.", "lora.down.", "to_k_lora.down."))
            if "attn2" in key and "to_k" in key and down and key.endswith("weight"):
                shape = handle.get_slice(key).get_shape()
                if len(shape) >= 2:
                    in_features.add(int(shape[1]))
    in_features |= {factors[1] * factors[2] for factors in lokr_inputs.values() if len(factors) == 2}
    return in_features, sgm_te


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash: SHA-256 of the tensor bytes after the safetensors header (so metadata edits keep it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_len)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_loras(pipe: Any, loras: list[Lora]) -> list[str]:
    """Load each LoRA as its own adapter and set their scales: plain LoRA files (diffusers and kohya formats) with
    diffusers' load_lora_weights, DoRA and LoKr files (ours, both formats) through peft (load_adapter_file)."""
    names = [f"lora{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras, strict=True):
        try:
            if not load_adapter_file(pipe, lora.path, name):
                pipe.load_lora_weights(str(lora.path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError, SdloraError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SdloraError(f"--lora {lora.path}: could not load it into the base model: {first}") from exc
    if names:
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    return names


def load_adapter_file(pipe: Any, path: Path, adapter_name: str) -> bool:
    """Load a DoRA or LoKr file (kohya/LyCORIS keys or our peft-format diffusers file) as adapter `adapter_name`;
    False for a plain LoRA file, which is left to diffusers."""
    from safetensors import safe_open

    from sdlora.lora import kohya, lycoris, peft
    from sdlora.lora.kinds import KINDS, file_kind

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118 (safe_open is not a dict)
    if KINDS[file_kind(keys)].diffusers_reads:
        return False
    if kohya.is_kohya_state_dict(keys):
        lycoris.load_kohya(pipe, families.detect(pipe), path, adapter_name)
    else:
        peft.load_file_adapters(pipe, path, adapter_name)
    return True


def check_finite(lora: Lora) -> None:
    """Refuse a LoRA file holding NaN/inf values (what a diverged training writes) before anything renders: it
    would turn every image black or noise while the command succeeds."""
    import torch
    from safetensors import safe_open

    with safe_open(str(lora.path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UsageError(
                    f"--lora {lora.path}: tensor {key} holds NaN/inf values (a training that diverged); use an "
                    "earlier checkpoint's LoRA or train again with a lower --lr"
                )

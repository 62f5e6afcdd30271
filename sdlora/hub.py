"""Where a base model named by the user lives: a local path, a hub id the hub answers for, or its folder in the
local Hugging Face cache; decided in a second, with the real reason when it is none of them."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from sdlora.errors import UsageError
from sdlora.weights import SINGLE_FILE_SUFFIXES

HUB_TIMEOUT = 5.0  # s to wait for the hub's answer about a model before calling it unreachable
DIFFUSERS_CONFIGS = ("model_index.json", "config.json")  # a pipeline's; a lone component's (a VAE)
HUB_ID = re.compile(r"[\w.-]{1,96}/[\w.-]{1,96}")  # OWNER/NAME, as the hub spells its model ids


def resolve(base: str, what: str = "base model") -> str:
    """Where diffusers should load `base` from: a local path as it is; a hub id as itself when the hub answers
    for it, else as its folder in the local Hugging Face cache. Anything else fails now, in one line with the
    real reason (no such folder, not cached and offline, hub unreachable, no such model on the hub), instead
    of after a minute of diffusers retrying. `what` names it in messages (a "training adapter" is looked up too)."""
    path = Path(base).expanduser()
    if path.exists():
        return str(path)
    if looks_local(base):
        raise UsageError(f"{base}: no such file or folder")
    if not HUB_ID.fullmatch(base) or ".." in base:
        raise UsageError(f"{base}: no such file or folder, and not a hub id (those are OWNER/NAME); check the path")
    where = f"could not load {what} {base!r}"
    cached = _cached_folder(base)
    if cached is not None and _hub_offline():
        return cached
    if _hub_offline():
        raise UsageError(
            f"{where}: no such folder here, and not in the local Hugging Face cache ({_cache_dir()}), which is all "
            "HF_HUB_OFFLINE=1 allows; give a local folder or .safetensors file, or download it with the hub online"
        )
    problem = _hub_problem(base)
    if problem is None:
        return base
    if cached is not None and problem.startswith("the hub"):
        return cached  # unreachable: the cached copy, without the retries
    raise UsageError(f"{where}: no such folder here, and {problem}")


def looks_local(base: str) -> bool:
    """A path by its shape: a model file's suffix, or starting like a path (never a hub id's shape)."""
    return Path(base).suffix.lower() in SINGLE_FILE_SUFFIXES or base.startswith((".", "/", "~", "\\"))


def _hub_offline() -> bool:
    import os

    from huggingface_hub import constants

    # The constant is read when huggingface_hub is imported; the environment may have changed since (tests, serve).
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached_folder(repo_id: str) -> str | None:
    """The snapshot folder of `repo_id` in the local cache, if it holds a diffusers config."""
    from huggingface_hub import try_to_load_from_cache

    for name in DIFFUSERS_CONFIGS:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return str(Path(found).parent)
    return None


@functools.lru_cache(maxsize=16)
def _hub_problem(repo_id: str) -> str | None:
    """None when the hub has `repo_id` with a diffusers config in it; else what is wrong, as the end of a sentence.
    One request with a short timeout and no retries; asked once per process (every loader of a run asks)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        return None  # gated: the download says whether this user has accepted its terms
    except RepositoryNotFoundError:
        return "the hub has no model of that name (or it is private: log in with `hf auth login`); check the id"
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        return f"the hub answered HTTP {status} about it and it is not cached; try again later"
    except Exception as exc:  # noqa: BLE001 - no network, DNS, proxy, TLS, timeout: the transports raise many kinds
        name = type(exc).__name__
        return (
            f"the hub can't be reached to download it ({name}) and it is not in the local cache ({_cache_dir()}); "
            "connect to the network, or give a local diffusers folder or .safetensors file"
        )
    files = {sibling.rfilename for sibling in info.siblings or ()}
    if files and not files & set(DIFFUSERS_CONFIGS):
        singles = sorted(name for name in files if name.endswith(".safetensors") and "/" not in name)
        also = f" (it has {singles[0]}: download that file and give its path)" if singles else ""
        return f"the hub's {repo_id} is not a diffusers model: it has no model_index.json{also}"
    return None

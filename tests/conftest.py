"""Shared fixtures: tiny pipelines saved once per test session, offline everywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: any hub access fails fast instead of hanging or downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# One torch thread per test process, and in the CLI processes tests start (they inherit it): xdist runs one worker per
# core, and the tiny models are launch-bound, so a second thread per worker only waits for a core the other worker
# holds. On the busy 2-core machine, tests/test_train_sdxl.py + test_adapters.py on two workers took 87 s with one
# thread and had not finished in 900 s with torch's default two. Set before torch is imported; a value the caller set
# is kept. The golden scenarios pin their own threads (tests/golden.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders of the tiny sd1 / sd2 / sdxl pipelines, built lazily and saved once per session."""
    from sdlora import testing

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> Path:
            built[family] = testing.save_tiny_pipeline(family, root / family)
            self[family] = built[family]
            return built[family]

    return Lazy()


@pytest.fixture(scope="module")
def two_torch_threads():
    """Two torch threads for a module's in-process runs (the CLI processes it starts keep one). A single-file base's
    transformer holds the folder's bits at other memory offsets; on one thread its image came out one level of 255 off
    at one pixel against the folder's (Flux.1 and klein), on two, as those tests were written, equal."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd1(tiny_models) -> Path:
    return tiny_models["sd1"]


@pytest.fixture(scope="session")
def tiny_sd2(tiny_models) -> Path:
    return tiny_models["sd2"]


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_models) -> Path:
    return tiny_models["sdxl"]


def pytest_collection_modifyitems(config, items):
    import importlib.util

    cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption(
        "--screenshots",
        default=None,
        metavar="DIR",
        help="save the web app's screenshots here (tools/ui_screenshots.py passes docs/ui); default: none taken",
    )

"""The pip-installable fork of ComfyUI (hiddenswitch/pip-and-uv-installable-ComfyUI) imported on the CPU for
bench/parity.py: the families upstream's snapshot here predates (Z-Image and FLUX.2 [klein]: parity_zimage;
Qwen-Image and -Edit: parity_qwen) render through its code.

One setup: the fork's packages, comfy_extras included (its nodes), exported outside the repository (checked at
87606c5f, 2026-02-10; the mirror lacks two blobs nothing here reads, llama_tokenizer/tokenizer.json and
paligemma's npz, so each blob is written on its own rather than by `git archive`), and the venv with our stack
plus ComfyUI's requirements; nothing else is installed. What the node modules import only to download, type-hint
or handle images (STAND_INS) is a stand-in module while the fork imports.

    git -C MIRROR ls-tree -r HEAD comfy comfy_api comfy_compatibility comfy_config comfy_execution comfy_extras |
        while read mode type sha path; do
            mkdir -p "FORK/${path%/*}"; git -C MIRROR cat-file blob $sha > "FORK/$path" || rm "FORK/$path"; done
    PYTHONPATH=$PWD:$PWD/bench nice -n 15 /work/scratch/comfy/venv/bin/python bench/parity.py --comfyui FORK \
        --case tiny-zimage tiny-zimage-turbo tiny-klein tiny-klein-distilled tiny-qwenimage tiny-qwenedit

`import_fork` then names the fork's node table and folder registry as upstream's top-level modules `nodes` and
`folder_paths`, so that parity_comfy.execute runs a workflow with either ComfyUI the same way.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

# Imported by the fork on the way to its nodes, used only to download, type-hint or edit images; absent here.
STAND_INS = (
    "requests_cache",
    "can_ada",
    "jaxtyping",
    "cv2",
    "torchvision",
    "torchvision.models",
    "torchvision.transforms",
)
# The fork's node modules (comfy_extras.nodes) whose nodes the workflows use, beside comfy.nodes.base_nodes:
# ModelSamplingAuraFlow; EmptySD3LatentImage; EmptyFlux2LatentImage, Flux2Scheduler; SamplerCustomAdvanced,
# RandomNoise, CFGGuider, KSamplerSelect; TextEncodeQwenImageEditPlus.
NODE_MODULES = ("nodes_model_advanced", "nodes_sd3", "nodes_flux", "nodes_custom_sampler", "nodes_qwen")


class StandIn(types.ModuleType):
    """A module whose every attribute is an empty (subscriptable) class: `from x import Y` and `Y[...]` work."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__class_getitem__": classmethod(lambda cls, key: cls)})


def is_fork(checkout: Path) -> bool:
    """Whether `checkout` is the fork (its `comfy` a package with comfy.cmd) rather than upstream ComfyUI."""
    return (checkout / "comfy/cmd").is_dir()


def import_fork(checkout: Path) -> None:
    """Import the fork from `checkout` on the CPU (its tracing start-up stubbed, latent previews off, STAND_INS
    stand-ins while it imports), and make `nodes` (NODE_CLASS_MAPPINGS: its base nodes and NODE_MODULES' nodes)
    and `folder_paths` its own."""
    import comfyui_dit

    sys.path.insert(0, str(checkout))
    from comfy.cli_args import args
    from comfy.cli_args_types import LatentPreviewMethod

    args.cpu = True
    args.disable_all_custom_nodes = True
    args.preview_method = LatentPreviewMethod.NoPreviews  # its previewer looks for (downloads) a TAESD first
    comfyui_dit.stub_fork_startup()
    import diffusers  # noqa: F401  (before the stand-ins: they must not see them)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    missing = [name for name in STAND_INS if importlib.util.find_spec(name.split(".")[0]) is None]
    for name in missing:
        sys.modules[name] = StandIn(name)
    try:
        import comfy.sd  # noqa: F401
        from comfy.cmd import folder_paths
        from comfy.nodes import base_nodes

        modules = [importlib.import_module(f"comfy_extras.nodes.{name}") for name in NODE_MODULES]
    finally:
        for name in missing:
            sys.modules.pop(name, None)
    table = types.ModuleType("nodes")
    table.NODE_CLASS_MAPPINGS = dict(base_nodes.NODE_CLASS_MAPPINGS)
    for module in modules:
        table.NODE_CLASS_MAPPINGS |= node_classes(module)
    sys.modules["nodes"], sys.modules["folder_paths"] = table, folder_paths


def node_classes(module: types.ModuleType) -> dict[str, Any]:
    """A node module's classes by class_type, as ComfyUI registers them: its NODE_CLASS_MAPPINGS, or (nodes of
    ComfyUI's V3 API) each node of its comfy_entrypoint extension's get_node_list under its schema's node_id."""
    if hasattr(module, "NODE_CLASS_MAPPINGS"):
        return dict(module.NODE_CLASS_MAPPINGS)

    async def listed() -> list[Any]:
        return await (await module.comfy_entrypoint()).get_node_list()

    return {node.GET_SCHEMA().node_id: node for node in asyncio.run(listed())}

"""Run generate's photo and refiner workflows (sdlora.comfyui.workflow.build with a Photo or a Refiner) through
ComfyUI's own node classes on a tiny SD 1.x checkpoint, and check what they keep and repaint.

ComfyUI is never a dependency of sdlora: export upstream ComfyUI outside the repo and run this with the Python of
bench/parity.py (our stack plus ComfyUI's requirements):

    PYTHONPATH=$PWD:$PWD/bench nice -n 15 /tmp/comfy-venv/bin/python bench/comfyui_photo.py --comfyui /tmp/comfyui

Cases: img2img (LoadImage -> VAEEncode -> KSampler at denoise 0.5), keep-face on a normal model (LoadImageMask,
SetLatentNoiseMask, the face composited back through InvertMask + ImageCompositeMasked), keep-face through a
refiner (a second CheckpointLoaderSimple, KSamplerAdvanced), and keep-face on a 9-channel inpainting UNet
(InpaintModelConditioning: ComfyUI's model takes the mask and masked photo as input). The photo is noise and the
"face" a square whose mask is white outside it: printed per case, the mean difference from the photo inside the
face (0: kept exactly) and outside it (repainted).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

SIZE, FACE = 64, (20, 20, 44, 44)


def base_checkpoint(root: Path, inpainting: bool) -> Path:
    """A tiny SD 1.x diffusers folder (a 9-channel UNet for `inpainting`), and its single file in root/checkpoints."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from sdlora import testing

    folder = root / "base"
    if inpainting:
        pipe = testing.build_tiny_pipeline("sd1")
        unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})
        StableDiffusionInpaintPipeline(**{**pipe.components, "unet": unet}).save_pretrained(folder)
    else:
        testing.save_tiny_pipeline("sd1", folder)
    (root / "checkpoints").mkdir()
    testing.write_single_file(folder, root / "checkpoints" / "base.safetensors")
    return folder


def cases(inpainting: bool) -> dict[str, dict[str, Any]]:
    from sdlora.comfyui.workflow import Photo, Refiner

    face = Photo("comfyui-input.png", 1.0, "comfyui-mask.png", inpainting)
    if inpainting:
        return {"keep-face, 9-channel UNet": {"photo": face}}
    refiner = Refiner("base.safetensors", 0.3, 6)
    return {
        "img2img 0.5": {"photo": Photo("comfyui-input.png", 0.5)},
        "keep-face": {"photo": face},
        "keep-face + refiner": {"photo": face, "refiner": refiner},
    }


def run(inpainting: bool) -> dict[str, dict[str, float]]:
    import folder_paths
    import parity_comfy
    from comfy_extras import nodes_mask

    from sdlora.comfyui import workflow
    from sdlora.families.comfyui import ComfyParts, loader

    root = Path(tempfile.mkdtemp(prefix="comfyui-photo-"))
    base = base_checkpoint(root, inpainting)
    (root / "input").mkdir()
    folder_paths.set_input_directory(str(root / "input"))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    photo.save(root / "input" / "comfyui-input.png")
    face = Image.new("L", (SIZE, SIZE), 0)
    face.paste(255, FACE)
    ImageOps.invert(face).save(root / "input" / "comfyui-mask.png")  # generate's file: white where it repaints
    classes = parity_comfy.node_classes
    parity_comfy.node_classes = lambda: classes() | nodes_mask.NODE_CLASS_MAPPINGS  # InvertMask, ImageCompositeMasked
    parts = ComfyParts(
        nodes={"checkpoint": loader("CheckpointLoaderSimple", ckpt_name="base.safetensors")},
        model=["checkpoint", 0], clip=["checkpoint", 1], vae=["checkpoint", 2], latent="EmptyLatentImage", cfg=5.0,
    )  # fmt: skip
    settings = workflow.Settings(6, 5.0, "dpmpp_2m_karras", SIZE, SIZE, "ugly")
    source, core = np.asarray(photo).astype(float), (slice(FACE[1] + 2, FACE[3] - 2), slice(FACE[0] + 2, FACE[2] - 2))
    results = {}
    for name, extra in cases(inpainting).items():
        graph = workflow.build(parts, [], settings, [("a photo", 1)], "a", **extra)
        assert workflow.problems(graph) == [], workflow.problems(graph)
        with parity_comfy.tiny_loading("sd1", base, root):
            saved = parity_comfy.execute(graph, {"checkpoints": root / "checkpoints"})
        out = (saved["a_0000"][0].float().cpu().numpy() * 255).round()
        results[name] = {
            "face_diff": float(np.abs(out[core] - source[core]).mean()),
            "outside_diff": float(np.abs(out[: FACE[1]] - source[: FACE[1]]).mean()),
        }
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (upstream)")
    parser.add_argument("--json", type=Path, help="write the results here")
    options = parser.parse_args()
    import parity_comfy

    parity_comfy.import_comfy(options.comfyui)
    results = run(inpainting=False) | run(inpainting=True)
    if options.json:
        options.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

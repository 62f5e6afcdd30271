"""ComfyUI workflows in API format ({id: {"class_type", "inputs"}}, a link is [node id, output index]) that render
what sdlora rendered: the family's loaders (Family.comfyui_parts), the LoRA files at their strength, pivotal
embeddings as `embedding:NAME`, one KSampler per image with sdlora's sampler, steps, guidance, size and seed; and
the check of a workflow against ComfyUI's built-in node list (nodes.json)."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlora import __version__
from sdlora.errors import SdloraError
from sdlora.families.comfyui import ComfyParts, checkpoint_file
from sdlora.fsutil import atomic_write_text

NODES_FILE = Path(__file__).with_name("nodes.json")

# Our sampler names (sdlora.generate.render.SCHEDULERS) -> (ComfyUI's sampler_name, its scheduler, what differs;
# None: the same sampler on the same sigmas). diffusers' Euler, Euler a, DDIM and UniPC space their timesteps as
# the base's scheduler config says (SD 1.x: "leading"), ComfyUI's "normal"/"ddim_uniform" evenly from the top.
SAMPLERS: dict[str, tuple[str, str, str | None]] = {
    "dpmpp_2m_karras": ("dpmpp_2m", "karras", None),
    "euler_a": ("euler_ancestral", "normal", "Euler a: ComfyUI's 'normal' timesteps differ slightly from diffusers'"),
    "euler": ("euler", "normal", "Euler: ComfyUI's 'normal' timesteps differ slightly from diffusers'"),
    "ddim": ("ddim", "ddim_uniform", "DDIM: ComfyUI's 'ddim_uniform' timesteps differ slightly from diffusers'"),
    "unipc": ("uni_pc", "normal", "UniPC: ComfyUI's uni_pc (bh1, 'normal' timesteps) is not diffusers' (bh2)"),
    # Flow-matching Euler on linspace(1, 1/steps) shifted: ComfyUI's "simple" schedule takes the same sigmas.
    "flow_euler": ("euler", "simple", None),
}
# The sampler `train.sample_like = "comfyui"` renders with when the configured one has no exact ComfyUI twin (a
# flow-matching family turns it into its own, flow_euler, as for every config made without seeing the base).
REPRODUCIBLE_DEFAULT = "dpmpp_2m_karras"


def reproducible(sampler: str) -> bool:
    """Whether ComfyUI has the same sampler on the same sigmas as ours called `sampler`."""
    return SAMPLERS[sampler][2] is None


REFERENCE_LATENT = "ReferenceLatent"  # ComfyParts.references: photos as latents on the conditioning
# The image inputs of the prompt encoders that take reference photos (ComfyParts.references), in order.
ENCODER_IMAGES = {"TextEncodeQwenImageEditPlus": ("image1", "image2", "image3"), "TextEncodeQwenImageEdit": ("image",)}


@dataclass(frozen=True)
class LoraFile:
    """One LoRA as ComfyUI's loras folder holds it."""

    name: str  # its file name (NAME.safetensors)
    strength: float = 1.0
    text_encoders: bool = False  # it holds text-encoder keys: LoraLoader, else LoraLoaderModelOnly
    embedding: tuple[str, str] | None = None  # pivotal tuning: (trigger word, embedding name: NAME_emb)


@dataclass(frozen=True)
class Settings:
    """What every image of a workflow shares (the resolved sdlora.generate.render.Sampling)."""

    steps: int
    cfg: float  # diffusers' guidance_scale
    sampler: str  # our name
    width: int
    height: int
    negative: str = ""


@dataclass(frozen=True)
class Photo:
    """--init-image or --keep-face: the photo as sdlora fitted it to the render size, as ComfyUI's input folder
    holds it; `mask` (keep-face) the image of what is repainted (white: all but the face)."""

    image: str
    strength: float = 1.0  # img2img's strength (diffusers) -> KSampler's denoise
    mask: str | None = None
    inpainting_model: bool = False  # the base takes the mask and masked photo as input (a 9-channel UNet, Fill)


@dataclass(frozen=True)
class Refiner:
    """--refiner: an img2img pass of the decoded base image with a second checkpoint (no LoRA), `steps` steps of
    which the last int(steps x strength) run, as diffusers' img2img does."""

    checkpoint: str  # its file name in ComfyUI's checkpoints folder
    strength: float
    steps: int
    note: str | None = None  # where the file name is a guess (families.comfyui.checkpoint_file)


IMG2IMG_NOTE = (
    "img2img: diffusers' strength S runs the last int(steps x S) steps of the steps-step schedule; ComfyUI's "
    "denoise S runs all steps on the last S of a steps/S-step schedule (the same noise range, finer steps). For "
    "diffusers' own sigmas use KSamplerAdvanced with start_at_step = steps - int(steps x S)"
)
INPAINT_NOTE = (
    "keep-face: diffusers inpaints with the mask made binary (>= 0.5) at latent size, ComfyUI with the feathered "
    "mask itself; the photo's face is then composited back with the feathered mask in both"
)
REFINER_NOTE = (
    "refiner: KSamplerAdvanced runs the same steps of the refiner's schedule as diffusers' img2img at its strength;"
    " sdlora hands the refiner the base's image rounded to 8 bits, ComfyUI its decoded floats"
)


def with_embeddings(prompt: str, loras: list[LoraFile]) -> str:
    """The prompt as ComfyUI asks for pivotal tokens: the trigger word (matched as sdlora's tokenizer rewrite does)
    becomes `embedding:NAME`, a word of its own (ComfyUI reads an embedding name up to the next space or comma)."""
    for lora in loras:
        if lora.embedding is None:
            continue
        word, name = lora.embedding
        pattern = re.compile(rf"(?<![\w<]){re.escape(word)}(?![\w>])", re.IGNORECASE)
        prompt = pattern.sub(functools.partial(_embedding, f"embedding:{name}"), prompt)
    return prompt


def _embedding(text: str, match: re.Match[str]) -> str:
    ends_word = match.end() == len(match.string) or match.string[match.end()] in " ,\n"
    return text if ends_word else f"{text} "


def build(
    parts: ComfyParts,
    loras: list[LoraFile],
    settings: Settings,
    images: list[tuple[str, int]],
    prefix: str,
    vae: str | None = None,
    photo: Photo | None = None,
    refiner: Refiner | None = None,
    references: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The API-format graph rendering each (prompt, seed) of `images` as image `prefix`_NNNN: loaders -> LoRAs ->
    sampling shift -> KSampler per image (or, where the family's schedule is a sigmas node, SamplerCustomAdvanced;
    shared prompt encodings and latent) -> VAEDecode -> SaveImage. With a `photo` the latent is the photo's
    (img2img at its strength, or keep-face's inpainting with the face composited back); with a `refiner` each image
    passes through it before it is saved; `references` (generate --reference: file names in ComfyUI's input folder)
    reach every prompt as the family takes them (ComfyParts.references). Node ids are "1", "2", ... in that order;
    the first node's `_meta.sdlora` says what differs from sdlora's render."""
    sampler, scheduler, differs = SAMPLERS[settings.sampler]
    nodes: dict[str, dict[str, Any]] = dict(parts.nodes)
    model, clip, decoder, said = parts.model, parts.clip, parts.vae, [*parts.notes, *([differs] if differs else [])]
    if vae is not None:  # model.vae: the replacement VAE, as ComfyUI's vae folder holds it
        name, note = checkpoint_file(vae, {})
        nodes["vae_replacement"] = node("VAELoader", vae_name=name)
        decoder, said = ["vae_replacement", 0], [*said, *([note] if note else [])]
    for i, lora in enumerate(loras):
        if lora.text_encoders:
            inputs = {"lora_name": lora.name, "strength_model": lora.strength, "strength_clip": lora.strength}
            nodes[f"lora{i}"] = node("LoraLoader", **inputs, model=model, clip=clip)
            model, clip = [f"lora{i}", 0], [f"lora{i}", 1]
        else:
            inputs = {"lora_name": lora.name, "strength_model": lora.strength}
            nodes[f"lora{i}"] = node("LoraLoaderModelOnly", **inputs, model=model)
            model = [f"lora{i}", 0]
    if parts.sampling is not None:
        nodes["sampling"] = {**parts.sampling, "inputs": {**parts.sampling["inputs"], "model": model}}
        model = ["sampling", 0]
    refs = _reference_nodes(nodes, parts, references or [], decoder)
    said += list(parts.reference_notes) if refs else []
    negative = _prompt(nodes, parts, "negative", settings.negative, clip, (refs, decoder))
    if photo is None:
        nodes["latent"] = node(parts.latent, width=settings.width, height=settings.height, batch_size=1)
        latent = ["latent", 0]
    else:
        latent, notes = _photo_nodes(nodes, photo, decoder)
        said += [note for note in notes if note != IMG2IMG_NOTE or parts.sigmas is None]  # SplitSigmas: exact
    if refiner is not None:
        said += _refiner_loader(nodes, refiner, settings.negative)
    encoded: dict[str, tuple[str, list[Any], list[Any], list[Any]]] = {}  # prompt -> (key, positive, negative, latent)
    for index, (prompt, seed) in enumerate(images):
        if prompt not in encoded:
            key = f"prompt{len(encoded)}"
            positive = _encode(nodes, parts, key, with_embeddings(prompt, loras), clip, (refs, decoder))
            encoded[prompt] = (key, positive, negative, latent)
            if photo is not None and photo.inpainting_model:  # the mask and masked photo go in with the prompts
                links = {"vae": decoder, "pixels": ["photo", 0], "mask": ["mask", 0], "noise_mask": False}
                nodes[f"{key}i"] = node("InpaintModelConditioning", positive=positive, negative=negative, **links)
                encoded[prompt] = (key, [f"{key}i", 0], [f"{key}i", 1], [f"{key}i", 2])
            if refiner is not None:  # the plain prompt: the LoRA and its embeddings are the base's
                nodes[f"refiner_{key}"] = node("CLIPTextEncode", text=prompt, clip=["refiner", 1])
        key, positive, negative, start = encoded[prompt]
        conditioning = {"positive": positive, "negative": negative}
        strength = photo.strength if photo is not None else 1.0
        if parts.sigmas is None:
            inputs = {"seed": seed, "steps": settings.steps, "cfg": parts.cfg, "sampler_name": sampler}
            inputs |= {"scheduler": scheduler, "denoise": strength, "model": model, **conditioning}
            nodes[f"sample{index}"] = node("KSampler", **inputs, latent_image=start)
        else:
            if "sigmas" not in nodes:
                nodes["sampler"] = node("KSamplerSelect", sampler_name=sampler)
                size = {"width": settings.width, "height": settings.height}
                nodes["sigmas"] = node(parts.sigmas, steps=settings.steps, **size)
                if strength < 1:  # diffusers' img2img: the last int(steps x strength) steps of the schedule
                    skipped = settings.steps - int(settings.steps * strength)
                    nodes["sigmas_img2img"] = node("SplitSigmas", sigmas=["sigmas", 0], step=skipped)
            sigmas = ["sigmas_img2img", 1] if "sigmas_img2img" in nodes else ["sigmas", 0]
            nodes[f"noise{index}"] = node("RandomNoise", noise_seed=seed)
            nodes[f"guider{index}"] = node("CFGGuider", cfg=parts.cfg, model=model, **conditioning)
            links = {"noise": [f"noise{index}", 0], "guider": [f"guider{index}", 0], "sampler": ["sampler", 0]}
            links |= {"sigmas": sigmas, "latent_image": start}
            nodes[f"sample{index}"] = node("SamplerCustomAdvanced", **links)
        nodes[f"decode{index}"] = node("VAEDecode", samples=[f"sample{index}", 0], vae=decoder)
        image = [f"decode{index}", 0]
        if refiner is not None:
            image = _refine(nodes, refiner, index, f"refiner_{key}", seed, image, (sampler, scheduler, parts.cfg))
        if photo is not None and photo.mask is not None:  # keep-face: the photo's own face back, feathered
            inputs = {"destination": image, "source": ["photo", 0], "x": 0, "y": 0, "resize_source": False}
            nodes[f"face{index}"] = node("ImageCompositeMasked", **inputs, mask=["face_mask", 0])
            image = [f"face{index}", 0]
        nodes[f"save{index}"] = node("SaveImage", filename_prefix=f"{prefix}_{index:04d}", images=image)
    about = {"version": __version__, "sampler": settings.sampler, "cfg": settings.cfg, "notes": said}
    return numbered(nodes, about)


def _encode(nodes: dict[str, Any], parts: ComfyParts, key: str, text: str, clip: list[Any], refs: tuple) -> list[Any]:
    """A positive prompt's encoding (through the family's distilled guidance node where it has one)."""
    encoded = _prompt(nodes, parts, key, text, clip, refs)
    if parts.guidance is None:
        return encoded
    nodes[f"{key}g"] = {**parts.guidance, "inputs": {**parts.guidance["inputs"], "conditioning": encoded}}
    return [f"{key}g", 0]


def _reference_nodes(nodes: dict[str, Any], parts: ComfyParts, names: list[str], vae: list[Any]) -> list[list[Any]]:
    """Each reference photo loaded from ComfyUI's input folder (scaled as the pipeline scales it): its image, or
    where the base takes references as latents (ReferenceLatent) its VAE latent. [] without photos."""
    if names and parts.references is None:
        raise SdloraError("--reference: this base's ComfyUI nodes take no reference photos")
    links = []
    for i, name in enumerate(names, start=1):
        nodes[f"reference{i}"] = node("LoadImage", image=name)
        image = [f"reference{i}", 0]
        if parts.reference_scale is not None:
            scale = parts.reference_scale
            nodes[f"reference{i}_scaled"] = {**scale, "inputs": {**scale["inputs"], "image": image}}
            image = [f"reference{i}_scaled", 0]
        if parts.references == REFERENCE_LATENT:
            nodes[f"reference{i}_latent"] = node("VAEEncode", pixels=image, vae=vae)
            image = [f"reference{i}_latent", 0]
        links.append(image)
    return links


def _prompt(nodes: dict[str, Any], parts: ComfyParts, key: str, text: str, clip: list[Any], refs: tuple) -> list[Any]:
    """A prompt's conditioning: the family's prompt node (CLIPTextEncode, or the Edit template's encoder), or with
    reference photos (`refs`: their links and the VAE) the family's encoder that takes them, or the prompt node
    followed by one ReferenceLatent per photo; then the family's reference method (Edit-2511's)."""
    links, vae = refs
    if links and parts.references != REFERENCE_LATENT:
        images = dict(zip(ENCODER_IMAGES[str(parts.references)], links, strict=False))
        nodes[key] = node(str(parts.references), prompt=text, clip=clip, vae=vae, **images)
    else:
        nodes[key] = node(parts.prompt_node[0], **{parts.prompt_node[1]: text}, clip=clip)
    out = [key, 0]
    for i, latent in enumerate(links if parts.references == REFERENCE_LATENT else [], start=1):
        nodes[f"{key}_reference{i}"] = node(REFERENCE_LATENT, conditioning=out, latent=latent)
        out = [f"{key}_reference{i}", 0]
    if links and parts.reference_method is not None:
        method = parts.reference_method
        nodes[f"{key}_method"] = {**method, "inputs": {**method["inputs"], "conditioning": out}}
        out = [f"{key}_method", 0]
    return out


def _photo_nodes(nodes: dict[str, Any], photo: Photo, vae: list[Any]) -> tuple[list[Any], list[str]]:
    """The photo (and keep-face's mask) loaded from ComfyUI's input folder; the latent sampling starts from (an
    inpainting model's comes from InpaintModelConditioning, per prompt) and what differs from sdlora's render."""
    nodes["photo"] = node("LoadImage", image=photo.image)
    if photo.mask is None:
        nodes["photo_latent"] = node("VAEEncode", pixels=["photo", 0], vae=vae)
        return ["photo_latent", 0], [IMG2IMG_NOTE] if photo.strength < 1 else []
    nodes["mask"] = node("LoadImageMask", image=photo.mask, channel="red")  # white: repainted
    nodes["face_mask"] = node("InvertMask", mask=["mask", 0])  # white: the photo's face, composited back
    if photo.inpainting_model:
        return [], [INPAINT_NOTE]
    nodes["photo_latent"] = node("VAEEncode", pixels=["photo", 0], vae=vae)
    nodes["photo_masked"] = node("SetLatentNoiseMask", samples=["photo_latent", 0], mask=["mask", 0])
    return ["photo_masked", 0], [INPAINT_NOTE]


def _refiner_loader(nodes: dict[str, Any], refiner: Refiner, negative: str) -> list[str]:
    nodes["refiner"] = node("CheckpointLoaderSimple", ckpt_name=refiner.checkpoint)
    nodes["refiner_negative"] = node("CLIPTextEncode", text=negative, clip=["refiner", 1])
    return [REFINER_NOTE, *([f"refiner: {refiner.note}"] if refiner.note else [])]


def _refine(
    nodes: dict[str, Any], refiner: Refiner, index: int, key: str, seed: int, image: list[Any], how: tuple
) -> list[Any]:
    """The refiner pass of one decoded image (`key`: its prompt's refiner encoding): encoded with the refiner's VAE,
    the last int(steps x strength) steps of its schedule, decoded."""
    sampler, scheduler, cfg = how
    nodes[f"refiner_encode{index}"] = node("VAEEncode", pixels=image, vae=["refiner", 2])
    inputs = {"add_noise": "enable", "noise_seed": seed, "steps": refiner.steps, "cfg": cfg}
    inputs |= {
        "sampler_name": sampler,
        "scheduler": scheduler,
        "positive": [key, 0],
        "negative": ["refiner_negative", 0],
    }
    inputs |= {"start_at_step": refiner.steps - int(refiner.steps * refiner.strength), "end_at_step": 10000}
    inputs |= {"return_with_leftover_noise": "disable", "latent_image": [f"refiner_encode{index}", 0]}
    nodes[f"refine{index}"] = node("KSamplerAdvanced", model=["refiner", 0], **inputs)
    nodes[f"refiner_decode{index}"] = node("VAEDecode", samples=[f"refine{index}", 0], vae=["refiner", 2])
    return [f"refiner_decode{index}", 0]


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def numbered(nodes: dict[str, dict[str, Any]], about: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`nodes` under ids "1", "2", ... (ComfyUI's own kind), links renamed; `about` in the first node's _meta."""
    ids = {key: str(i) for i, key in enumerate(nodes, start=1)}
    out: dict[str, dict[str, Any]] = {}
    for key, value in nodes.items():
        inputs = {
            name: [ids[v[0]], v[1]] if isinstance(v, list) and len(v) == 2 and v[0] in ids else v
            for name, v in value["inputs"].items()
        }
        out[ids[key]] = {"class_type": value["class_type"], "inputs": inputs, "_meta": {"title": key}}
    out["1"]["_meta"]["sdlora"] = about
    return out


def save(path: Path, workflow: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")


@functools.lru_cache(maxsize=1)
def known_nodes() -> dict[str, Any]:
    """nodes.json: {"sources": [{repo, commit, date}], "nodes": {class: {"inputs", "outputs", "in"}}}."""
    return json.loads(NODES_FILE.read_text(encoding="utf-8"))


def problems(workflow: dict[str, dict[str, Any]]) -> list[str]:
    """What would stop ComfyUI's executor: a class that is no built-in node, an input it does not take, a link to
    a node that is not in the graph or to an output it does not have. [] for a sound graph."""
    nodes, found = known_nodes()["nodes"], []
    for key, value in workflow.items():
        known = nodes.get(value.get("class_type"))
        if known is None:
            found.append(f"node {key}: {value.get('class_type')!r} is not a built-in ComfyUI node")
            continue
        for name, link in value["inputs"].items():
            if known["inputs"] is not None and name not in known["inputs"]:
                found.append(f"node {key}: {value['class_type']} takes no input {name!r}")
            if not isinstance(link, list):
                continue
            target = workflow.get(link[0])
            if target is None:
                found.append(f"node {key}: input {name} links to node {link[0]}, which is not in the graph")
                continue
            outputs = nodes.get(target["class_type"], {}).get("outputs")
            if outputs is not None and not 0 <= link[1] < outputs:
                found.append(f"node {key}: input {name} links to output {link[1]} of {target['class_type']}")
    return found

"""ComfyUI workflow files (API format) for every family: built-in nodes only (the list generated from ComfyUI's
source, tools/comfyui_nodes.py), known inputs, consistent links, the render's settings, pivotal embeddings, the
PNG `prompt` chunk, and `train.sample_like = "comfyui"`."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from sdlora import families
from sdlora.comfyui import workflow
from sdlora.families.comfyui import checkpoint_file
from sdlora.generate import pngmeta
from sdlora.generate.render import SCHEDULERS, Sampling

NAMES = list(families.REGISTRY)


@pytest.fixture(scope="module", params=NAMES)
def family_pipe(request):
    family = families.get(request.param)
    return family, family.tiny_pipeline(0)


def render(family, pipe, **changes):
    """A two-prompt workflow of a pivotal-tuned LoRA with the family's own sampler, and its settings."""
    values = {"steps": 7, "cfg": 4.5, "sampler": family.samplers[0], "width": 96, "height": 64, "negative": "blurry"}
    values |= changes
    settings = workflow.Settings(**values)
    parts = family.comfyui_parts(pipe, "owner/some-base", settings.width, settings.height, settings.cfg)
    lora = workflow.LoraFile("alice.safetensors", 1.0, bool(family.trainable_text_encoders), ("sks", "alice_emb"))
    images = [("a photo of sks person", 42), ("sks, an oil painting", 43)]
    return workflow.build(parts, [lora], settings, images, prefix="alice"), settings


def of_class(graph, class_type):
    return [node for node in graph.values() if node["class_type"] == class_type]


def test_node_list_says_where_it_came_from():
    known = workflow.known_nodes()
    repos = {source["repo"] for source in known["sources"]}
    assert repos == {"Comfy-Org/ComfyUI", "hiddenswitch/pip-and-uv-installable-ComfyUI"}
    assert all(re.fullmatch(r"[0-9a-f]{40}", source["commit"]) for source in known["sources"])
    nodes = known["nodes"]
    assert len(nodes) > 300 and nodes["KSampler"]["outputs"] == 1 and nodes["CheckpointLoaderSimple"]["outputs"] == 3
    assert "seed" in nodes["KSampler"]["inputs"] and "EmptyFlux2LatentImage" in nodes  # classic and V3 nodes


def test_every_sdlora_sampler_has_a_comfyui_one():
    assert set(workflow.SAMPLERS) == set(SCHEDULERS)
    assert workflow.reproducible(workflow.REPRODUCIBLE_DEFAULT)
    assert not workflow.reproducible("euler_a") and workflow.reproducible("flow_euler")


def test_workflow_is_a_sound_graph_of_built_in_nodes_with_the_settings(family_pipe):
    family, pipe = family_pipe
    graph, settings = render(family, pipe)
    assert workflow.problems(graph) == []
    assert list(graph) == [str(i) for i in range(1, len(graph) + 1)]
    samplers = of_class(graph, "KSampler")
    sampler_name, scheduler, _ = workflow.SAMPLERS[settings.sampler]
    if not samplers:  # the family's schedule is a sigmas node (klein): SamplerCustomAdvanced, seeds in RandomNoise
        (sigmas,) = [node for node in graph.values() if "steps" in node["inputs"]]
        assert sigmas["inputs"] == {"steps": 7, "width": 96, "height": 64}
        assert [n["inputs"]["noise_seed"] for n in of_class(graph, "RandomNoise")] == [42, 43]
        assert {n["inputs"]["sampler_name"] for n in of_class(graph, "KSamplerSelect")} == {sampler_name}
        samplers = of_class(graph, "CFGGuider")  # where the cfg is, below
        assert len(samplers) == len(of_class(graph, "SamplerCustomAdvanced")) == 2
        latent = graph[of_class(graph, "SamplerCustomAdvanced")[0]["inputs"]["latent_image"][0]]["inputs"]
    else:
        assert [s["inputs"]["seed"] for s in samplers] == [42, 43]
        for node in samplers:
            inputs = node["inputs"]
            assert (inputs["steps"], inputs["sampler_name"], inputs["scheduler"]) == (7, sampler_name, scheduler)
            assert inputs["denoise"] == 1.0
        latent = graph[samplers[0]["inputs"]["latent_image"][0]]["inputs"]
    assert (latent["width"], latent["height"], latent["batch_size"]) == (96, 64, 1)
    prompt_class, text = family.comfyui_parts(pipe, "owner/some-base", 96, 64, 4.5).prompt_node
    texts = [node["inputs"][text] for node in of_class(graph, prompt_class)]
    assert texts == ["blurry", "a photo of embedding:alice_emb person", "embedding:alice_emb, an oil painting"]
    loras = of_class(graph, "LoraLoader") + of_class(graph, "LoraLoaderModelOnly")
    assert [lora["inputs"]["lora_name"] for lora in loras] == ["alice.safetensors"]
    assert loras[0]["inputs"]["strength_model"] == 1.0
    assert [s["inputs"]["filename_prefix"] for s in of_class(graph, "SaveImage")] == ["alice_0000", "alice_0001"]
    # The guidance reaches ComfyUI as its cfg or as distilled guidance on the positive prompt.
    guided = of_class(graph, "FluxGuidance")
    if guided:
        assert {g["inputs"]["guidance"] for g in guided} == {4.5} and samplers[0]["inputs"]["cfg"] == 1.0
    else:
        assert samplers[0]["inputs"]["cfg"] in (4.5, 5.5)  # diffusers' cfg, or 1 + it (pos + g * (pos - neg))
    assert "sdlora" in graph["1"]["_meta"]


@pytest.mark.parametrize("change", [{"steps": 8}, {"cfg": 6.0}, {"width": 128}, {"negative": "dark"}])
def test_a_changed_setting_changes_the_workflow(family_pipe, change):
    family, pipe = family_pipe
    assert render(family, pipe, **change)[0] != render(family, pipe)[0]


def test_png_carries_the_workflow_as_comfyuis_prompt_chunk(family_pipe, tmp_path):
    family, pipe = family_pipe
    graph = render(family, pipe)[0]
    path = tmp_path / "image.png"
    pngmeta.save_png(path, Image.new("RGB", (8, 8)), "a photo\nSteps: 7", prompt=graph)
    text = Image.open(path).text
    assert json.loads(text["prompt"]) == graph and text["parameters"] == "a photo\nSteps: 7"


def test_problems_name_what_comfyui_would_refuse():
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 3]}},
        "3": {"class_type": "NoSuchNode", "inputs": {}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "colour": "red"}},
    }
    found = workflow.problems(graph)
    assert len(found) == 4
    assert any("9, which is not in the graph" in p for p in found)
    assert any("output 3 of CheckpointLoaderSimple" in p for p in found)
    assert any("'NoSuchNode' is not a built-in" in p for p in found)
    assert any("takes no input 'colour'" in p for p in found)


def test_checkpoint_names_as_a_comfyui_models_folder_holds_them(tmp_path):
    assert checkpoint_file(str(tmp_path / "my-model.safetensors"), {}) == ("my-model.safetensors", None)
    known = {"org/base": "base-v1.safetensors"}
    name, note = checkpoint_file("org/base", known)
    assert name == "base-v1.safetensors" and "org/base" in note
    name, note = checkpoint_file(str(tmp_path / "diffusers-folder"), known)
    assert name == "diffusers-folder.safetensors" and "pick your file" in note


def test_embedding_names_stand_alone_as_comfyui_reads_them():
    lora = workflow.LoraFile("a.safetensors", embedding=("sks", "a_emb"))
    assert workflow.with_embeddings("sks. Sks person; asks", [lora]) == "embedding:a_emb . embedding:a_emb person; asks"


def test_sample_like_comfyui_samples_with_a_sampler_comfyui_has(tmp_path):
    from sdlora.config import Config

    config = Config.model_validate({"generate": {"scheduler": "euler_a"}})
    assert Sampling.for_training(config).scheduler == "euler_a"
    like = Config.model_validate({"generate": {"scheduler": "euler_a"}, "train": {"sample_like": "comfyui"}})
    assert Sampling.for_training(like).scheduler == workflow.REPRODUCIBLE_DEFAULT
    same = Config.model_validate({"generate": {"scheduler": "dpmpp_2m_karras"}, "train": {"sample_like": "comfyui"}})
    assert Sampling.for_training(same).scheduler == "dpmpp_2m_karras"


def test_a_family_schedule_given_as_a_sigmas_node_samples_with_samplercustomadvanced():
    """FLUX.2's schedule (a shift depending on size and steps) exists in ComfyUI only as a sigmas node."""
    from sdlora.families.comfyui import ComfyParts, loader

    parts = ComfyParts(
        nodes={"unet": loader("UNETLoader", unet_name="m.safetensors", weight_dtype="default"),
               "clip": loader("CLIPLoader", clip_name="qwen_3_4b.safetensors", type="flux2", device="default"),
               "vae": loader("VAELoader", vae_name="flux2-vae.safetensors")},
        model=["unet", 0], clip=["clip", 0], vae=["vae", 0], latent="EmptyFlux2LatentImage", cfg=4.0,
        sigmas="Flux2Scheduler",
    )  # fmt: skip
    settings = workflow.Settings(12, 4.0, "flow_euler", 128, 96, "")
    graph = workflow.build(parts, [workflow.LoraFile("a.safetensors")], settings, [("x", 1), ("y", 2)], "a")
    assert workflow.problems(graph) == [] and not of_class(graph, "KSampler")
    (sigmas,) = of_class(graph, "Flux2Scheduler")
    assert sigmas["inputs"] == {"steps": 12, "width": 128, "height": 96}
    assert [n["inputs"]["noise_seed"] for n in of_class(graph, "RandomNoise")] == [1, 2]
    assert {n["inputs"]["cfg"] for n in of_class(graph, "CFGGuider")} == {4.0}
    assert of_class(graph, "KSamplerSelect")[0]["inputs"]["sampler_name"] == "euler"
    assert len(of_class(graph, "SamplerCustomAdvanced")) == len(of_class(graph, "SaveImage")) == 2


def test_a_replacement_vae_decodes(family_pipe):
    family, pipe = family_pipe
    parts = family.comfyui_parts(pipe, "owner/base", 64, 64, 3.0)
    settings = workflow.Settings(4, 3.0, family.samplers[0], 64, 64)
    graph = workflow.build(parts, [], settings, [("x", 1)], "a", vae="madebyollin/sdxl-vae-fp16-fix")
    assert workflow.problems(graph) == []
    (decode,) = of_class(graph, "VAEDecode")
    assert graph[decode["inputs"]["vae"][0]]["inputs"] == {"vae_name": "sdxl-vae-fp16-fix.safetensors"}


def links_to(graph, link, class_type):
    """The node `link` ([id, output]) points at, checked to be a `class_type`."""
    target = graph[link[0]]
    assert target["class_type"] == class_type, (link, target)
    return target


def test_img2img_samples_from_the_fitted_photo_at_the_strength(family_pipe):
    family, pipe = family_pipe
    parts = family.comfyui_parts(pipe, "owner/base", 64, 64, 3.0)
    settings = workflow.Settings(10, 3.0, family.samplers[0], 64, 64)
    photo = workflow.Photo("comfyui-input-0002.png", strength=0.55)
    graph = workflow.build(parts, [], settings, [("x", 1), ("y", 2)], "a", photo=photo)
    assert workflow.problems(graph) == [] and not [n for n in graph.values() if "batch_size" in n["inputs"]]
    (load,) = of_class(graph, "LoadImage")
    assert load["inputs"] == {"image": "comfyui-input-0002.png"}
    (encode,) = of_class(graph, "VAEEncode")
    assert graph[encode["inputs"]["pixels"][0]] is load
    notes = graph["1"]["_meta"]["sdlora"]["notes"]
    if of_class(graph, "KSampler"):
        for sample in of_class(graph, "KSampler"):
            assert sample["inputs"]["denoise"] == 0.55 and graph[sample["inputs"]["latent_image"][0]] is encode
        assert workflow.IMG2IMG_NOTE in notes
    else:  # a sigmas node: diffusers' own steps, the last int(10 x 0.55) = 5 of the 10
        for sample in of_class(graph, "SamplerCustomAdvanced"):
            assert graph[sample["inputs"]["latent_image"][0]] is encode
            split = links_to(graph, sample["inputs"]["sigmas"], "SplitSigmas")
            assert sample["inputs"]["sigmas"][1] == 1 and split["inputs"]["step"] == 5
        assert workflow.IMG2IMG_NOTE not in notes
    assert not of_class(graph, "ImageCompositeMasked")


@pytest.mark.parametrize("inpainting_model", [False, True])
def test_keep_face_inpaints_all_but_the_face_and_composites_it_back(family_pipe, inpainting_model):
    family, pipe = family_pipe
    parts = family.comfyui_parts(pipe, "owner/base", 64, 64, 3.0)
    settings = workflow.Settings(6, 3.0, family.samplers[0], 64, 64)
    photo = workflow.Photo("comfyui-input.png", 1.0, "comfyui-mask.png", inpainting_model)
    graph = workflow.build(parts, [], settings, [("x", 1), ("y", 2), ("x", 3)], "a", photo=photo)
    assert workflow.problems(graph) == []
    (load,) = of_class(graph, "LoadImage")
    (mask,) = of_class(graph, "LoadImageMask")
    assert load["inputs"]["image"] == "comfyui-input.png"
    assert mask["inputs"] == {"image": "comfyui-mask.png", "channel": "red"}  # white: what gets repainted
    samples = of_class(graph, "KSampler") or of_class(graph, "SamplerCustomAdvanced")
    assert len(samples) == 3 and all(s["inputs"].get("denoise", 1.0) == 1.0 for s in samples)
    assert not of_class(graph, "SplitSigmas")
    if inpainting_model:  # mask and masked photo as the model's input, no latent blending (diffusers' 9-channel)
        conditioned = of_class(graph, "InpaintModelConditioning")
        assert len(conditioned) == 2 and {c["inputs"]["noise_mask"] for c in conditioned} == {False}
        assert all(graph[c["inputs"]["mask"][0]] is mask for c in conditioned)
        if of_class(graph, "KSampler"):
            for sample in samples:
                assert [sample["inputs"][k][1] for k in ("positive", "negative", "latent_image")] == [0, 1, 2]
                links_to(graph, sample["inputs"]["latent_image"], "InpaintModelConditioning")
    else:  # the photo's latent, repainted where the mask is white (diffusers blends the kept part each step)
        (noise_mask,) = of_class(graph, "SetLatentNoiseMask")
        assert graph[noise_mask["inputs"]["mask"][0]] is mask
        for sample in samples:
            links_to(graph, sample["inputs"]["latent_image"], "SetLatentNoiseMask")
    composites = of_class(graph, "ImageCompositeMasked")
    assert len(composites) == 3
    for composite in composites:  # the photo where the face is: the mask inverted
        assert graph[composite["inputs"]["source"][0]] is load
        assert graph[links_to(graph, composite["inputs"]["mask"], "InvertMask")["inputs"]["mask"][0]] is mask
        links_to(graph, composite["inputs"]["destination"], "VAEDecode")
    assert [links_to(graph, s["inputs"]["images"], "ImageCompositeMasked") for s in of_class(graph, "SaveImage")]
    assert workflow.INPAINT_NOTE in graph["1"]["_meta"]["sdlora"]["notes"]


def test_refiner_pass_runs_diffusers_img2img_steps_with_a_second_checkpoint():
    family = families.get("sdxl")
    from sdlora.families.comfyui import ComfyParts, loader

    parts = ComfyParts(
        nodes={"checkpoint": loader("CheckpointLoaderSimple", ckpt_name="sd_xl_base_1.0.safetensors")},
        model=["checkpoint", 0], clip=["checkpoint", 1], vae=["checkpoint", 2], latent="EmptyLatentImage", cfg=5.0,
    )  # fmt: skip
    settings = workflow.Settings(30, 5.0, "dpmpp_2m_karras", 64, 64, "ugly")
    refiner = workflow.Refiner("sd_xl_refiner_1.0.safetensors", 0.3, 30)
    lora = workflow.LoraFile("alice.safetensors", 1.0, True, ("sks", "alice_emb"))
    graph = workflow.build(parts, [lora], settings, [("sks smiling", 7), ("sks smiling", 8)], "a", refiner=refiner)
    assert workflow.problems(graph) == [] and family.supports_refiner
    loaders = of_class(graph, "CheckpointLoaderSimple")
    assert [n["inputs"]["ckpt_name"] for n in loaders] == ["sd_xl_base_1.0.safetensors", refiner.checkpoint]
    refined = of_class(graph, "KSamplerAdvanced")
    assert [n["inputs"]["noise_seed"] for n in refined] == [7, 8]
    for node in refined:
        inputs = node["inputs"]
        assert graph[inputs["model"][0]] is loaders[1]  # no LoRA on the refiner
        assert (inputs["steps"], inputs["start_at_step"], inputs["end_at_step"]) == (30, 21, 10000)  # int(30 x 0.3)
        assert (inputs["add_noise"], inputs["cfg"], inputs["sampler_name"]) == ("enable", 5.0, "dpmpp_2m")
        assert links_to(graph, inputs["positive"], "CLIPTextEncode")["inputs"]["text"] == "sks smiling"
        assert links_to(graph, inputs["negative"], "CLIPTextEncode")["inputs"]["text"] == "ugly"
        encode = links_to(graph, inputs["latent_image"], "VAEEncode")["inputs"]
        assert graph[encode["vae"][0]] is loaders[1]
        assert graph[links_to(graph, encode["pixels"], "VAEDecode")["inputs"]["vae"][0]] is loaders[0]
    for save in of_class(graph, "SaveImage"):
        decoded = links_to(graph, save["inputs"]["images"], "VAEDecode")["inputs"]
        assert graph[decoded["vae"][0]] is loaders[1] and graph[decoded["samples"][0]] in refined
    assert len(of_class(graph, "CLIPTextEncode")) == 4  # base: negative, prompt; refiner: negative, prompt
    assert workflow.REFINER_NOTE in graph["1"]["_meta"]["sdlora"]["notes"]


def test_comfyui_inputs_are_a_runs_files_not_images_of_its_own(tmp_path):
    from sdlora import layout
    from sdlora.generate.output import first_free, written_by_generate

    for name in ("0003-7.png", "comfyui-input-0009.png", "comfyui-mask-0009.png", "comfyui-input.png", "notes.png"):
        (tmp_path / name).write_bytes(b"x")
    assert layout.run_file(layout.COMFYUI_INPUT, 9) == "comfyui-input-0009.png"
    assert layout.is_sheet("comfyui-input-0009.png") and layout.is_sheet("comfyui-mask.png")  # eval skips them
    assert not layout.is_sheet("0003-7.png") and not layout.is_sheet("comfyui.json")
    assert first_free(tmp_path) == 10
    assert sorted(p.name for p in written_by_generate(tmp_path)) == [
        "0003-7.png", "comfyui-input-0009.png", "comfyui-input.png", "comfyui-mask-0009.png"
    ]  # fmt: skip


def test_flux_dev_workflow_says_comfyui_pads_t5_to_256_tokens():
    """Measured by bench/parity.py (tiny-flux-512): sdlora's dev renders at 512 T5 tokens differ from ComfyUI's."""
    from sdlora.families.flux.tiny import tiny_flux_pipeline
    from sdlora.testing import build_tiny_pipeline

    flux = families.get("flux")
    dev = flux.comfyui_parts(build_tiny_pipeline("flux"), "black-forest-labs/FLUX.1-dev", 64, 64, 3.5)
    assert any("256 tokens" in note and "max_sequence_length = 256" in note for note in dev.notes)
    schnell = flux.comfyui_parts(tiny_flux_pipeline(schnell=True), "black-forest-labs/FLUX.1-schnell", 64, 64, 0.0)
    assert not any("256 tokens" in note for note in schnell.notes)  # schnell renders at 256 already
    # What bench/parity.py's tiny-flux-schnell rendered within 1/255: no guidance node, cfg 1, the static shift
    assert (schnell.guidance, schnell.cfg, dev.cfg) == (None, 1.0, 1.0)
    assert schnell.sampling == {"class_type": "ModelSamplingAuraFlow", "inputs": {"shift": 1.0}}
    assert dev.sampling["class_type"] == "ModelSamplingFlux" and dev.guidance["inputs"]["guidance"] == 3.5


def reference_pipelines():
    """Each kind of pipeline that takes generate --reference's photos: Qwen-Image-Edit-2511 (Edit-Plus), the first
    Edit, FLUX.2 [klein], FLUX.1 Kontext (tiny, random weights)."""
    from diffusers import FluxKontextPipeline, QwenImageEditPipeline

    edit = families.get("qwenedit").tiny_pipeline(0)
    parts = ("scheduler", "vae", "text_encoder", "tokenizer", "processor", "transformer")
    first = QwenImageEditPipeline(**{name: getattr(edit, name) for name in parts})
    kontext = FluxKontextPipeline.from_pipe(families.get("flux").tiny_pipeline(0))
    return {"2511": edit, "first edit": first, "klein": families.get("klein").tiny_pipeline(0), "kontext": kontext}


@pytest.fixture(scope="module")
def with_references():
    return reference_pipelines()


@pytest.mark.parametrize("kind", ["2511", "first edit", "klein", "kontext"])
def test_a_reference_workflow_loads_its_photos_into_both_prompts(with_references, kind):
    """generate --reference's workflow: a sound graph of built-in nodes with the run's settings, each photo loaded
    from ComfyUI's input folder and reaching the positive and the negative prompt as the base takes it (the Edit
    prompt encoder with the VAE, or a VAE latent through ReferenceLatent)."""
    pipe = with_references[kind]
    family = families.detect(pipe)
    count = families.references(family, pipe)
    names = [f"comfyui-reference-{i}.png" for i in range(1, count + 1)]
    settings = workflow.Settings(7, 4.5, family.samplers[0], 96, 64, "blurry")
    parts = family.comfyui_parts(pipe, "owner/some-edit-base", 96, 64, 4.5)
    images = [("a photo of this person as an astronaut", 42), ("this person, an oil painting", 43)]
    graph = workflow.build(parts, [], settings, images, prefix="refs", references=names)
    assert workflow.problems(graph) == []
    assert [node["inputs"] for node in of_class(graph, "LoadImage")] == [{"image": name} for name in names]
    loaded = {key for key, node in graph.items() if node["class_type"] == "LoadImage"}
    (decode,) = {tuple(node["inputs"]["vae"]) for node in of_class(graph, "VAEDecode")}

    def photos_behind(link):
        """The LoadImage nodes a conditioning link depends on, following links back."""
        seen, todo = set(), [link[0]]
        while todo:
            key = todo.pop()
            seen.add(key)
            todo += [v[0] for v in graph[key]["inputs"].values() if isinstance(v, list) and v[0] not in seen]
        return seen & loaded

    samplers = of_class(graph, "KSampler") or of_class(graph, "CFGGuider")
    assert len(samplers) == 2
    for sampler in samplers:
        assert photos_behind(sampler["inputs"]["positive"]) == loaded == photos_behind(sampler["inputs"]["negative"])
    if parts.references == workflow.REFERENCE_LATENT:
        assert len(of_class(graph, "ReferenceLatent")) == 3 * count  # the negative's and two prompts'
        assert {tuple(node["inputs"]["vae"]) for node in of_class(graph, "VAEEncode")} == {decode}
        texts = [node["inputs"]["text"] for node in of_class(graph, "CLIPTextEncode")]
    else:  # Qwen-Image-Edit: the prompt encoder takes the photos and the VAE
        encoders = of_class(graph, parts.references)
        assert {tuple(node["inputs"]["vae"]) for node in encoders} == {decode}
        texts = [node["inputs"]["prompt"] for node in encoders]
        assert not of_class(graph, "CLIPTextEncode")
    assert texts == ["blurry", *(prompt for prompt, _ in images)]
    if kind == "kontext":
        assert len(of_class(graph, "FluxKontextImageScale")) == count == 1
    methods = [
        node["inputs"]["reference_latents_method"] for node in of_class(graph, "FluxKontextMultiReferenceLatentMethod")
    ]
    zero_cond_t = getattr(pipe.transformer.config, "zero_cond_t", False)  # 2511's (the tiny first Edit shares it)
    assert methods == (["index_timestep_zero"] * 3 if zero_cond_t else [])
    if samplers[0]["class_type"] == "KSampler":
        assert [s["inputs"]["seed"] for s in samplers] == [42, 43] and {s["inputs"]["steps"] for s in samplers} == {7}
    else:
        assert [n["inputs"]["noise_seed"] for n in of_class(graph, "RandomNoise")] == [42, 43]
    assert set(parts.reference_notes) <= set(graph["1"]["_meta"]["sdlora"]["notes"])
    without = workflow.build(parts, [], settings, images, prefix="refs")
    assert not of_class(without, "LoadImage") and workflow.problems(without) == []


def test_reference_photos_are_a_runs_files_not_images_of_its_own(tmp_path):
    from sdlora import layout
    from sdlora.generate.output import written_by_generate

    assert layout.run_file(layout.COMFYUI_REFERENCE.format(2), 9) == "comfyui-reference-2-0009.png"
    for name in ("comfyui-reference-1.png", "comfyui-reference-2-0009.png"):
        (tmp_path / name).write_bytes(b"x")
        assert layout.is_sheet(name)  # eval skips them
    assert len(written_by_generate(tmp_path)) == 2  # a later run into the folder knows them as generate's


def test_qwen_image_edit_encodes_prompts_with_its_edit_template():
    """CLIPTextEncode wraps a prompt in Qwen-Image's template; sdlora renders an Edit model with the Edit template
    (bench/parity.py tiny-qwenedit), which ComfyUI's TextEncodeQwenImageEditPlus applies when given no image."""
    from types import SimpleNamespace

    from sdlora.families.qwenedit.family import TEMPLATE
    from sdlora.families.qwenimage.tiny import qwenimage_scheduler

    # what the workflow reads of the pipeline: the shift, and 2511's zero_cond_t (its reference method)
    pipe = SimpleNamespace(scheduler=qwenimage_scheduler(), transformer=SimpleNamespace(config={"zero_cond_t": True}))
    edit = families.get("qwenedit")
    graph, _ = render(edit, pipe)
    assert not of_class(graph, "CLIPTextEncode") and workflow.problems(graph) == []
    encoders = of_class(graph, "TextEncodeQwenImageEditPlus")
    assert [set(n["inputs"]) for n in encoders] == [{"clip", "prompt"}] * 3  # no image, no VAE: text alone
    assert edit.template == TEMPLATE != families.get("qwenimage").template
    graph, _ = render(families.get("qwenimage"), pipe)
    assert len(of_class(graph, "CLIPTextEncode")) == 3 and not of_class(graph, "TextEncodeQwenImageEditPlus")

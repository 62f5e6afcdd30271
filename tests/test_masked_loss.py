"""The face-weighted loss (train.masked_loss): the weighting math, masks cut and flipped with their images, prep's
masks lining up with its crops, the missing-mask error, and the benchmark's masks from the toy renderer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image, ImageDraw
from train_utils import square_entry
from typer.testing import CliRunner

from sdlora import objectives
from sdlora.cli import app
from sdlora.prep.manifest import write_manifest


def test_mask_weights_floor_and_mean():
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, :, :2] = 1.0  # top half face
    masks[1] = 1.0  # all face
    weights = objectives.mask_weights(masks, (4, 4), floor=0.1)
    # sample 0: 8 pixels at 1, 8 at the floor 0.1 -> mean 0.55; each divided by it
    assert torch.allclose(weights[0, 0, :2], torch.full((2, 4), 1 / 0.55))
    assert torch.allclose(weights[0, 0, 2:], torch.full((2, 4), 0.1 / 0.55))
    assert torch.equal(weights[1], torch.ones(1, 4, 4))  # an all-face mask is the plain loss, exactly
    assert torch.allclose(weights.mean(dim=(1, 2, 3)), torch.ones(2))
    # Averaged down to the latents: an 8x8 mask with its left half face -> 4x4 (area), then floored.
    big = torch.zeros(1, 1, 8, 8)
    big[..., :4] = 1.0
    small = objectives.mask_weights(big, (4, 4), floor=0.0)
    assert torch.allclose(small[0, 0, :, :2], torch.full((4, 2), 2.0)) and float(small[0, 0, :, 2:].max()) == 0.0


def test_weighted_loss_and_masked_prior_on_small_tensors():
    pred, goal = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    goal[..., 0, :] = 3.0  # the top row errs by 3 (squared 9), the bottom row by 1
    plain = objectives.denoising_loss(pred, goal)
    assert float(plain) == 5.0
    ones = objectives.mask_weights(torch.ones(1, 1, 2, 2), (2, 2), 0.1)
    assert torch.equal(objectives.denoising_loss(pred, goal, pixel_weights=ones), plain)
    top = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    weighted = objectives.denoising_loss(pred, goal, pixel_weights=objectives.mask_weights(top, (2, 2), 0.0))
    assert float(weighted) == pytest.approx(9.0)  # only the face (top) row counts, at weight 2 over 4 pixels
    # The masked prior: only outside the mask (weights 1 - mask), averaged over those weights.
    prior = objectives.masked_prior_loss(pred, goal, 1 - top)
    assert float(prior) == pytest.approx(1.0)


def _square(size: tuple[int, int], box: tuple[int, int, int, int], mode: str) -> Image.Image:
    image = Image.new(mode, size, 0)
    ImageDraw.Draw(image).rectangle(box, fill=255 if mode == "L" else (255, 255, 255))
    return image


def test_masks_follow_the_images_crop_bucket_and_flip(tmp_path):
    """A 96x64 (bucket) image and its mask with the same off-centre square: after the training cut (resize to
    cover the bucket, centre crop) and a flip, the mask's square is where the image's is."""
    from sdlora.train.batches import ImageSet
    from sdlora.train.data import Example

    box = (10, 8, 40, 50)  # off-centre, so a flip or a different crop would show
    _square((96, 64), box, "RGB").save(tmp_path / "img.png")
    _square((96, 64), box, "L").save(tmp_path / "mask.png")
    example = Example(tmp_path / "img.png", "a photo", (96, 64), (64, 96), (0, 0), tmp_path / "mask.png")
    images = ImageSet([example], [48, 64], flip=True, vae=None, cache=False)
    images.load_masks()
    for index in range(2):  # each resolution
        for flip in (0, 1):
            pixels = images.pixels[index]
            pixels = torch.flip(pixels, dims=[-1]) if flip else pixels
            mask = images.mask_batch([(index, flip)])[0, 0]
            assert mask.shape == pixels.shape[1:]
            agree = ((pixels[0] > 0) == (mask > 0.5)).float().mean()
            assert float(agree) > 0.98, (index, flip, float(agree))
    unmasked = ImageSet([Example(tmp_path / "img.png", "a photo")], 64, flip=False, vae=None, cache=False)
    unmasked.load_masks()
    assert torch.equal(unmasked.mask_batch([(0, 0)]), torch.ones(1, 1, 64, 64))  # no mask: every pixel alike


def test_masked_loss_without_masks_stops_before_any_model_loads(tmp_path):
    from train_utils import subject_set

    data = subject_set(tmp_path / "data")
    args = ["train", str(data), str(tmp_path / "out"), "--base", "nobody/no-model", "--set", "train.masked_loss=true"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}: train.masked_loss needs the face masks"), lines
    # A manifest without mask paths (prep from before masks) is the same error.
    entry = square_entry("img0.png", "/photos/a.png")
    line = json.loads(entry.model_dump_json())
    del line["mask"]  # as prep wrote manifests before masks
    (data / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "train.masked_loss needs the face masks" in result.output


@pytest.mark.slow
def test_prep_masks_line_up_with_the_crops(tmp_path):
    """prep's masks: one per kept crop, its size; the face dlib finds in the crop is inside the mask's core (every
    landmark at >= 0.9), the far corners outside; crop=center writes a mask only where a face is found."""
    import prep_photos

    from sdlora import config
    from sdlora.faces.dlib import DlibFaces
    from sdlora.prep.run import prep

    photos = tmp_path / "photos"
    photos.mkdir()
    prep_photos.framing(0, 0, 512, 520).save(photos / "a.png")
    prep_photos.framing(90, 10, 300, 480, mirror=True).save(photos / "b.jpg", quality=92)
    faces = DlibFaces()
    for crop in ("face", "center"):
        out = tmp_path / crop
        cfg = config.load(None, {"prep.resolution": 192, "prep.workers": 1, "prep.crop": crop, "prep.min_images": 1})
        report = prep(photos, out, cfg, progress=False)
        assert len(report.kept) == 2
        for entry in report.kept:
            assert entry.mask == f"masks/{Path(entry.image).stem}.png"
            with Image.open(out / entry.image) as image, Image.open(out / entry.mask) as mask_image:
                assert mask_image.size == image.size and mask_image.mode == "L"
                found = faces.detect(image.convert("RGB"))
                mask = numpy.asarray(mask_image, numpy.float32) / 255
            assert len(found) == 1
            points = numpy.clip(found[0].landmarks.round().astype(int), 0, numpy.array(mask.shape[::-1]) - 1)
            assert float(mask[points[:, 1], points[:, 0]].min()) >= 0.9, (crop, entry.image)
            assert max(mask[-1, 0], mask[-1, -1]) < 0.05, (crop, entry.image)  # the bottom corners: background
    # crop=center on a photo without a face: kept, without a mask
    from skimage import data

    faceless = tmp_path / "faceless"
    faceless.mkdir()
    Image.fromarray(data.coffee()).save(faceless / "coffee.png")
    cfg = config.load(None, {"prep.resolution": 128, "prep.workers": 1, "prep.crop": "center", "prep.min_images": 1})
    report = prep(faceless, tmp_path / "faceless-out", cfg, progress=False)
    assert [e.mask for e in report.kept] == [None] and not (tmp_path / "faceless-out" / "masks").exists()


def test_benchmark_writes_masks_from_the_renderers_face(tmp_path):
    """bench/identity: masks for a prepped set of toy renders, from where the renderer drew the head and hair."""
    from bench.identity.masks import write_masks
    from sdlora.faces import toyworld as world
    from sdlora.prep.manifest import read_manifest

    subject = world.Identity("tan", "red", "tall", "green", True, "mint")
    rng = __import__("random").Random(0)
    entries = []
    for i in range(2):
        world.render(subject, rng).save(tmp_path / f"{i:04d}.png")
        entries.append(square_entry(f"{i:04d}.png", f"/photos/{i}.png"))
    write_manifest(tmp_path / "manifest.jsonl", entries)
    assert write_masks(tmp_path, subject) == 2
    for entry in read_manifest(tmp_path):
        image = numpy.asarray(Image.open(tmp_path / entry.image).convert("RGB"), numpy.float32)
        mask = numpy.asarray(Image.open(tmp_path / entry.mask), numpy.float32) / 255
        background = numpy.linalg.norm(image - numpy.asarray(world.BACKGROUND["mint"]), axis=2) < 40
        assert float(mask[~background].mean()) > 0.9  # face, hair and glasses are inside
        assert float(mask[background].mean()) < 0.35 and float(mask[0, 0]) < 0.05

"""The shared rendering core: per-image seeds, batching, schedulers, grids (SD and SDXL)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlora import models
from sdlora.generate.render import SCHEDULERS, Sampling, make_grid, render_images, set_scheduler


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_render_images_is_per_image_seeded_and_batched(tiny_models, family):
    pipe = models.load_pipeline(str(tiny_models[family]))
    pipe.set_progress_bar_config(disable=True)
    sampling = Sampling(steps=2, cfg=5.0, scheduler="euler_a", width=64, height=48)
    batch = render_images(pipe, ["a photo", "a cat"], [7, 8], sampling.but(batch_size=2))
    alone = render_images(pipe, ["a cat"], [8], sampling.but(batch_size=1))
    other = render_images(pipe, ["a cat"], [9], sampling.but(batch_size=1))
    assert [image.size for image in batch] == [(64, 48), (64, 48)]
    # Image 1 of a batch equals the same prompt and seed rendered alone (batched kernels round differently).
    assert np.abs(_pixels(batch[1]) - _pixels(alone[0])).max() <= 2
    assert np.abs(_pixels(other[0]) - _pixels(alone[0])).max() > 10


def test_set_scheduler_keeps_prediction_type(tiny_sd2):
    from sdlora import families

    pipe = models.load_pipeline(str(tiny_sd2))
    unet_samplers = families.detect(pipe).samplers
    assert set(unet_samplers) == set(SCHEDULERS) - {"flow_euler"}  # every sampler but the flow-matching one
    for name in unet_samplers:
        class_name = SCHEDULERS[name][0]
        set_scheduler(pipe, name)
        assert type(pipe.scheduler).__name__ == class_name
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    set_scheduler(pipe, "dpmpp_2m_karras")
    assert pipe.scheduler.config.use_karras_sigmas and pipe.scheduler.config.algorithm_type == "dpmsolver++"
    set_scheduler(pipe, "euler")
    assert not pipe.scheduler.config.use_karras_sigmas


def test_make_grid_layout():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (10, 8), c) for c in colours]
    grid = make_grid(images, cols=2)
    assert grid.size == (20, 16)
    assert grid.getpixel((15, 2)) == (0, 255, 0)
    assert grid.getpixel((5, 12)) == (0, 0, 255)
    assert grid.getpixel((15, 12)) == (0, 0, 0)

"""DreamBooth prior preservation (train.preservation = "class_images"): the class images, from a folder or
generated once with the base model, paired with the subject's in every micro-batch (sdlora.train.batches)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora import layout
from sdlora.errors import UsageError
from sdlora.fsutil import atomic_path
from sdlora.train.data import Example, caption_of, list_images
from sdlora.train.methods.base import Build, Method

if TYPE_CHECKING:
    from sdlora.config import Config, TrainConfig
    from sdlora.generate.render import Sampling
    from sdlora.train.state import Plan

CLASS_IMAGES = layout.CLASS_IMAGES


def check_class_dir(class_dir: Path | None, token: str, limit: int) -> None:
    """Pre-flight: a given --class-dir exists and holds images, and no caption of the class images it uses (their
    IMG.txt) names the trigger word: class images show other people."""
    from sdlora.train.methods.pivotal import names_trigger

    if class_dir is None:
        return
    if not Path(class_dir).is_dir() or not list_images(Path(class_dir)):
        raise UsageError(f"--class-dir {class_dir}: no folder of .png/.jpg class images there")
    for example in class_examples(Path(class_dir), "", limit):
        if token and names_trigger([example], token):
            raise UsageError(
                f"{example.image.with_suffix('.txt')}: a class image's caption names the trigger word {token!r}; "
                "class images show other people, so take it out"
            )


def class_examples(class_dir: Path, prompt: str, limit: int, sidecars: bool = True) -> list[Example]:
    """Up to `limit` images of `class_dir`, each captioned by its IMG.txt (with `sidecars`) or the class prompt."""
    images = list_images(class_dir)[:limit]
    return [Example(path, caption_of(path, prompt) if sidecars else prompt) for path in images]


def generate_class_images(
    pipe: Any,
    folder: Path,
    *,
    prompt: str,
    count: int,
    seed: int,
    sampling: Sampling,
) -> None:
    """Render the missing class images (class-NNNNN.png, image i from seed + i) into `folder` with the same code
    as `sdlora generate`; images already there are reused, so a second run generates nothing."""
    from sdlora.generate.render import render_images

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / f"class-{i:05d}.png").is_file()]
    for start in range(0, len(missing), sampling.batch_size):
        chunk = missing[start : start + sampling.batch_size]
        images = render_images(pipe, [prompt] * len(chunk), [seed + i for i in chunk], sampling)
        for i, image in zip(chunk, images, strict=True):
            with atomic_path(folder / f"class-{i:05d}.png") as tmp:
                image.save(tmp, format="PNG")


def makes_class_images(tc: TrainConfig) -> bool:
    return tc.class_dir is None and bool(tc.class_prompt)


def class_images(config: Config, plan: Plan, pipe: Any, accelerator: Any) -> list[Example] | None:
    """Prior preservation's class examples: --class-dir, or generated once into OUT_DIR/class_images."""
    from sdlora.config import class_prompt_of

    tc = config.train
    if tc.class_dir is None and not tc.class_prompt:
        return None
    prompt = class_prompt_of(config)
    folder = Path(tc.class_dir) if tc.class_dir else plan.out_dir / CLASS_IMAGES
    if tc.class_dir is None:
        if accelerator.is_main_process:
            from sdlora.generate.render import Sampling

            # The sample grids' settings, without the negative prompt: class images show the plain class.
            sampling = Sampling.for_training(config).but(negative="")
            generate_class_images(
                pipe, folder, prompt=prompt, count=tc.num_class_images, seed=tc.seed, sampling=sampling
            )
        accelerator.wait_for_everyone()
    # Ready class images may carry their own captions (IMG.txt); rendered ones show the class prompt.
    return class_examples(folder, prompt, tc.num_class_images, sidecars=tc.class_dir is not None)


class ClassImages(Method):
    """train.class_prompt / class_dir: class images beside the subject's, their loss weighted prior_loss_weight."""

    name = "class_images"

    def active(self, tc: TrainConfig) -> bool:
        return tc.class_dir is not None or bool(tc.class_prompt)

    def check(self, config: Config, examples: Sequence[Example], dataset_dir: Path, token: str) -> None:
        check_class_dir(config.train.class_dir, token, config.train.num_class_images)
        if any(e.size and e.size[0] != e.size[1] for e in examples):
            raise UsageError(
                f"{dataset_dir}: prior preservation needs square images; run `sdlora prep` without --buckets"
            )

    def cached_prompts(self, config: Config, plan: Plan) -> list[str]:
        from sdlora.config import class_prompt_of

        prompt, tc = class_prompt_of(config), config.train
        own = class_examples(Path(tc.class_dir), prompt, tc.num_class_images) if tc.class_dir else []
        return [prompt, *(e.caption for e in own)]

    def rendered_prompts(self, config: Config, plan: Plan) -> list[list[str]]:
        tc = config.train
        return [[tc.class_prompt] * config.generate.batch_size] if makes_class_images(tc) else []

    def renders_with_base(self, tc: TrainConfig) -> bool:
        return makes_class_images(tc)

    def before_adapters(self, build: Build) -> None:
        build.classes = class_images(build.config, build.plan, build.pipe, build.accelerator)


METHOD = ClassImages()

"""Which config setting each command-line option sets: the tables the CLI builds its `options` from (the layer
between the config file and `--set`), one per command that reads the config. Plain data, no typer."""

from __future__ import annotations

from typing import Any

# Which config setting each command-line option sets (None: not given, the config file or default stands).
PREP_OPTIONS = {
    "token": "prep.token",
    "class_word": "prep.class_word",
    "resolution": "prep.resolution",
    "crop": "prep.crop",
    "overwrite": "prep.overwrite",
    "buckets": "prep.buckets",
    "min_images": "prep.min_images",
    "caption_template": "prep.caption_template",
    "workers": "prep.workers",
    "captions": "prep.captions",
    "captioner": "prep.captioner",
}
# Help texts of options whose full Annotated line would not fit one line of cli.py.
GENERATE_OPTIONS = {
    "base": "model.base",
    "allow_pickle": "model.allow_pickle",
    "quantize": "model.quantize",
    "lora": "generate.loras",
    "prompt_list": "generate.prompts",
    "negative": "generate.negative",
    "n": "generate.n",
    "batch_size": "generate.batch_size",
    "seed": "generate.seed",
    "steps": "generate.steps",
    "cfg": "generate.cfg",
    "scheduler": "generate.scheduler",
    "size": "generate.size",
    "fuse": "generate.fuse",
    "compare": "generate.compare",
    "keep_face": "generate.keep_face",
    "init_image": "generate.init_image",
    "strength": "generate.strength",
    "save_steps": "generate.save_steps",
    "refiner": "generate.refiner",
    "reference": "generate.reference",
    "api_model": "generate.api_model",
}

TRAIN_OPTIONS = {
    "base": "model.base",
    "allow_pickle": "model.allow_pickle",
    "allow_distilled": "model.allow_distilled",
    "quantize": "model.quantize",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "train_text_encoder": "lora.train_text_encoder",
    "adapter": "lora.kind",
    "name": "train.name",
    "steps": "train.steps",
    "resolution": "train.resolution",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "lr": "train.learning_rate",
    "text_encoder_lr": "train.text_encoder_learning_rate",
    "mixed_precision": "train.mixed_precision",
    "optimizer": "train.optimizer",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "compile": "train.compile",
    "checkpoint_every": "train.checkpoint_every",
    "keep_checkpoints": "train.keep_checkpoints",
    "resume": "train.resume",
    "class_prompt": "train.class_prompt",
    "num_class_images": "train.num_class_images",
    "prior_loss_weight": "train.prior_loss_weight",
    "class_dir": "train.class_dir",
    "preservation": "train.preservation",
    "sample_every": "train.sample_every",
    "eval_every": "train.eval_every",
    "seed": "train.seed",
    "overwrite": "train.overwrite",
    "pivotal": "train.pivotal",
    "control_dir": "train.control_dir",
    "offload_blocks": "train.offload_blocks",
}

EVAL_OPTIONS = {
    "base": "model.base",
    "n": "eval.n",
    "seed": "eval.seed",
    "face_model": "eval.face_model",
    "threshold": "eval.threshold",
    "clip": "eval.clip",
}

# `sdlora compare` scores like eval (--seeds is eval.n; eval.seed and eval.threshold through --set).
COMPARE_OPTIONS = {key: EVAL_OPTIONS[key] for key in ("base", "n", "face_model", "clip")}


def settings_of(values: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    """{config key: value} of the options in `table` (parameter name -> config key); empty lists count as unset."""
    return {key: values[name] if values[name] != [] else None for name, key in table.items()}

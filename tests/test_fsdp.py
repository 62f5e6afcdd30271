"""FSDP through accelerate (`accelerate launch --config_file examples/accelerate/fsdp.yaml -m sdlora train ...`):
the example config parses to FSDP2 with one unit per transformer block; the settings FSDP can't take are refused in
one line; 2 processes on the CPU (gloo) shard the tiny Z-Image transformer and give the LoRA tensors of 1 process,
and a checkpoint they wrote resumes on 1 process to the uninterrupted run's tensors (and optimizer state)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora.cli import app

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "accelerate" / "fsdp.yaml"
FILES = ["pytorch_lora_weights.safetensors", "person.safetensors"]


def test_example_config_is_fsdp2_wrapping_the_models_blocks():
    """What the README shows: accelerate reads the file as FSDP2, one unit per block of the model's
    _no_split_modules (no family's class names in it), sdlora's own gradient checkpointing instead of accelerate's."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIG))
    assert config.distributed_type == "FSDP" and config.num_processes == 2 and not config.use_cpu
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    assert fsdp["fsdp_activation_checkpointing"] is False and fsdp["fsdp_offload_params"] is False
    assert "accelerate launch --config_file examples/accelerate/fsdp.yaml -m sdlora train" in CONFIG.read_text()


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"model": {"quantize": "nf4"}}, "--quantize nf4"),
        ({"lora": {"train_text_encoder": True}}, "--train-text-encoder"),
        ({"train": {"pivotal": True}}, "--pivotal"),
        ({"train": {"optimizer": "prodigy"}}, "--optimizer prodigy"),
        ({"train": {"compile": True}}, "--compile"),
        ({"train": {"eval_every": 5}}, "--eval-every"),
    ],
)
def test_settings_fsdp_cant_take_are_refused_in_one_line(change, refused):
    from accelerate.utils import DistributedType

    from sdlora.config import Config
    from sdlora.errors import UsageError
    from sdlora.train import fsdp

    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    fsdp.check(Config(), accelerator)  # the defaults train
    with pytest.raises(UsageError) as error:
        fsdp.check(Config.model_validate(change), accelerator)
    message = str(error.value)
    assert message.startswith(refused) and "\n" not in message and "DDP" in message
    with pytest.raises(UsageError, match="fsdp_version: 2"):  # FSDP1
        fsdp.check(Config(), SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False))


def test_a_resume_keeps_the_global_batch_when_the_processes_change(tmp_path):
    """2 processes x 1 resume on one as 1 x 2; another per-process batch is refused with the one that fits."""
    import json

    from sdlora.errors import UsageError
    from sdlora.train.checkpoint import check_resumed_batch

    (tmp_path / "config.json").write_text(json.dumps({"train": {"batch_size": 1}}))
    folder = tmp_path / "checkpoints" / "step-000001"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "processes": 2}))
    assert check_resumed_batch(tmp_path, folder, 2, 1) is None
    assert check_resumed_batch(tmp_path, folder, 1, 2) is None
    assert check_resumed_batch(tmp_path, folder, 1, 1) == "note: global batch 2 -> 1 (1 processes now)"
    with pytest.raises(UsageError, match=r"--batch-size 3: .* resume with --batch-size 2 \(the same global batch\)"):
        check_resumed_batch(tmp_path, folder, 3, 1)


def test_a_sharded_denoiser_is_still_its_familys():
    """fully_shard swaps a module's class for FSDP<Name>(FSDPModule, Name): the families' claims look through it."""
    from sdlora.families.flow import model_class

    class ZImageTransformer2DModel:
        pass

    class FSDPModule:
        pass

    sharded = type("FSDPZImageTransformer2DModel", (FSDPModule, ZImageTransformer2DModel), {})()
    assert model_class(sharded) == model_class(ZImageTransformer2DModel()) == "ZImageTransformer2DModel"


def tensors(folder: Path, name: str) -> dict:
    return load_file(str(folder / name))


def assert_same(a: dict, b: dict, tolerance: float) -> None:
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= tolerance


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_and_their_checkpoint_resumes_on_one(tiny_models, tmp_path):
    import torch

    data, base = subject_set(tmp_path / "data"), tiny_models["zimage"]
    args = ["--base", str(base), "--resolution", "64", "--rank", "4", "--alpha", "8", "--lr", "1e-3", "--seed", "1",
            "--name", "person", "--no-pivotal", "--preservation", "none", "--steps", "2", "--checkpoint-every", "1",
            "--sample-every", "2", "--set", "train.sample_steps=2", "--gradient-checkpointing"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(data), str(tmp_path / "one"), *args, "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)]
    launch += ["--main_process_port", "29587", "-m", "sdlora", "train", str(data), str(tmp_path / "two")]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    two = subprocess.run([*launch, *args, "--batch-size", "1"], env=environment, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "FSDP2: the transformer sharded over 2 processes; units: 4 ZImageTransformerBlock + root" in two.stdout
    one, two_dir = tmp_path / "one", tmp_path / "two"
    moved = max(v.abs().max().item() for k, v in tensors(one, FILES[0]).items() if "lora_B" in k)
    assert moved > 1e-4  # it trained (lora_B starts at zero)
    for name in [*FILES, "checkpoints/step-000001/lora_state.safetensors"]:  # written whole, by one process
        assert_same(tensors(one, name), tensors(two_dir, name), 1e-3 * moved)
    assert (two_dir / "samples" / "step-000002.png").is_file()  # rendered by both, written by one
    # The checkpoint of step 1 by 2 processes x 1, resumed on 1 process x 2: the uninterrupted run's step 2.
    resumed = two_dir
    (two_dir / "checkpoints" / "step-000002").rename(tmp_path / "unused")
    again = ["train", str(data), str(resumed), "--config", str(resumed / "config.toml"), "--resume", "latest"]
    result = runner.invoke(app, [*again, "--batch-size", "2", "--checkpoint-every", "1"])
    assert result.exit_code == 0, result.output
    for name in FILES:
        assert_same(tensors(one, name), tensors(resumed, name), 1e-3 * moved)
    a, b = (torch.load(d / "checkpoints" / "step-000002" / "optimizer.bin") for d in (one, resumed))
    assert a["param_groups"] == b["param_groups"]
    assert (
        max((a["state"][i][k] - b["state"][i][k]).abs().max().item() for i in a["state"] for k in a["state"][i]) < 1e-6
    )

"""The likeness methods' list (sdlora.train.methods): every method is a Method with its own name, and a new one is
one entry in METHODS: set-up, the loop, checkpoints and the final files ask it without any other edit."""

from __future__ import annotations

from safetensors import safe_open
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.config import Config
from sdlora.train import methods


def test_every_method_is_a_method_with_its_own_name():
    names = [method.name for method in methods.METHODS]
    assert len(set(names)) == len(names) == 5 and all(isinstance(m, methods.Method) for m in methods.METHODS)
    assert {"pivotal", "class_images", "output_preservation", "masked_loss", "timestep_bias"} == set(names)
    plain_train = Config().train.model_copy(update={"pivotal": False, "preservation": "none"})
    assert methods.active(plain_train) == []  # the plain LoRA: no method asked anything


class Recording(methods.Method):
    """A method that is always on and writes down each verb it is asked, in order."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def active(self, tc):
        return True

    def check(self, config, examples, dataset_dir, token):
        self.calls.append(f"check {token}")

    def before_adapters(self, build):
        self.calls.append("before_adapters")

    def prepare(self, build):
        self.calls.append("prepare")
        build.states[self.name] = {"seen": 0}

    def with_batches(self, build):
        self.calls.append(f"with_batches {build.batches is not None}")

    def param_groups(self, state, tc):
        self.calls.append("param_groups")
        return []

    def before_step(self, run, state, step):
        state["seen"] += 1
        self.calls.append(f"before_step {step}")

    def loss_term(self, run, state, batch, noisy, pred):
        self.calls.append("loss_term")
        return None

    def write_files(self, state, folder, name, header):
        self.calls.append("write_files")
        return methods.Files(kohya_metadata={"test.recorded_steps": str(state["seen"])})


def test_a_new_method_is_one_list_entry(tiny_sd1, tmp_path, monkeypatch):
    recording = Recording()
    monkeypatch.setattr(methods, "METHODS", (*methods.METHODS, recording))
    data, out = subject_set(tmp_path / "data"), tmp_path / "out"
    args = ["train", data, out, "--base", tiny_sd1, "--steps", "2", "--resolution", "64", "--rank", "2"]
    args += ["--checkpoint-every", "0", "--sample-every", "0", "--name", "rec"]
    result = CliRunner().invoke(app, plain(args))
    assert result.exit_code == 0, result.output
    setup = ["check sks", "before_adapters", "prepare", "with_batches True", "param_groups"]
    steps = ["before_step 0", "loss_term", "before_step 1", "loss_term"]
    assert recording.calls == [*setup, *steps, "write_files"]
    with safe_open(str(out / "rec.safetensors"), "pt") as handle:
        assert handle.metadata()["test.recorded_steps"] == "2"

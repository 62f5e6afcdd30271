"""--offload-blocks (sdlora.train.offload): the hooks' order, each block's weights resident (a device copy, never
the CPU home) whenever it computes, forward and backward with gradient checkpointing, the same gradients and
LoRA as without offloading (SD's UNet and Qwen-Image's transformer), a resumed offloaded run, and the pre-flight's
one-line errors. On the CPU the "device copy" is a clone, so the hooks and their accounting run as on a GPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.errors import UsageError
from sdlora.train import offload

runner = CliRunner()


def tiny_qwen(layers: int = 3):
    """A Qwen-Image transformer of `layers` blocks, frozen, with a rank-4 LoRA on its attention, checkpointed."""
    from diffusers import QwenImageTransformer2DModel

    from sdlora.lora import peft

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    model.requires_grad_(False)
    return model, peft


def attach(model, peft) -> None:
    torch.manual_seed(1)
    peft.attach(model, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"], "lora")
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # lora_B too: gradients reach every LoRA tensor
    model.enable_gradient_checkpointing()


def step(model) -> dict[str, torch.Tensor]:
    """One forward and backward on fixed inputs; the LoRA gradients by name."""
    g = torch.Generator().manual_seed(2)
    out = model(
        hidden_states=torch.randn(1, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )[0]
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_hooks_order_residency_accounting_and_gradients():
    """3 blocks, the last 2 offloaded: forward on 1, prefetch 2, off 1, on 2, off 2; the backward's recomputation in
    reverse (2 then 1); every Linear of an offloaded block computes with a device copy (not its CPU home), in the
    forward and in the backward's recomputation; at most two blocks' copies alive (one computing, one prefetched);
    none left after the step; the LoRA tensors never move; gradients bitwise those without offloading."""
    plain, peft = tiny_qwen()
    attach(plain, peft)
    expected = step(plain)

    model, peft = tiny_qwen()
    state = offload.offload(model, 2, "cpu")
    attach(model, peft)
    before = [len(slots) for slots in state.slots]
    offload.adopt(state)  # as setup does: no new frozen tensor (a plain LoRA trains)
    assert [len(slots) for slots in state.slots] == before
    model.to("cpu")  # the LoRA follows, the offloaded frozen weights stay home
    assert state.names == ["transformer_blocks.1", "transformer_blocks.2"]
    homes = {id(s.home) for slots in state.slots for s in slots}
    lora = {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad}
    seen = {"forward": 0, "backward": 0}

    def check(module, _args):
        weight = module._parameters.get("weight")
        assert weight is None or weight.requires_grad or id(weight) not in homes, "a block computed off its copy"
        seen["backward" if torch._C._current_graph_task_id() != -1 else "forward"] += 1

    for block in state.blocks:
        for module in block.modules():
            if type(module) is torch.nn.Linear:
                module.register_forward_pre_hook(check)
    state.trace = []
    got = step(model)

    assert state.trace == [
        ("on", 0), ("prefetch", 1), ("off", 0), ("on", 1), ("off", 1),  # forward
        ("on", 1), ("prefetch", 0), ("off", 1), ("on", 0), ("off", 0),  # backward's recomputation, in reverse
    ]  # fmt: skip
    assert seen["forward"] > 0 and seen["backward"] > 0
    sizes = [sum(s.nbytes for s in slots) for slots in state.slots]
    assert max(sizes) < state.peak <= sizes[0] + sizes[1]  # one block computing and the next prefetched
    assert state.resident == 0  # every copy freed once the backward is done
    assert all(id(getattr(s.owner, s.table)[s.name]) in homes for slots in state.slots for s in slots)
    assert lora == {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got)
    offload.ignore_in_ddp(state, model)  # DDP leaves exactly the offloaded frozen tensors alone
    names = {n for n, _ in [*model.named_parameters(), *model.named_buffers()]}
    assert set(model._ddp_params_and_buffers_to_ignore) <= names
    assert len(model._ddp_params_and_buffers_to_ignore) == sum(len(slots) for slots in state.slots)
    model.to(torch.float64)  # a move or cast of the model leaves the offloaded frozen weights as they are
    assert all(s.owner._parameters.get(s.name) is None or s.home.dtype == torch.float32 for s in state.slots[0])
    assert state.static_bytes == sum(
        t.numel() * t.element_size()
        for n, t in [*plain.state_dict().items()]
        if "lora" not in n and not n.startswith(("transformer_blocks.1.", "transformer_blocks.2."))
    )


@pytest.mark.slow
def test_fp8_blocks_travel_as_float8_with_the_same_gradients():
    """With --quantize fp8 the offloaded weights are torchao Float8Tensors (1 byte a weight + row scales): their
    copies are too, and the gradients are bitwise those of the fp8 model without offloading."""
    from sdlora import fp8

    plain, peft = tiny_qwen()
    fp8.quantize(plain)
    attach(plain, peft)
    expected = step(plain)
    model, peft = tiny_qwen()
    fp8.quantize(model)
    state = offload.offload(model, 2, "cpu")
    attach(model, peft)
    state.trace = []
    got = step(model)
    assert "Float8Tensor" in {type(s.home).__name__ for s in state.slots[0]}
    assert len(state.trace) == 10 and state.resident == 0
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_preflight_errors_name_the_option(tiny_sd1, tmp_path):
    """More blocks than the base has, a negative count, no gradient checkpointing, --compile: one line, exit 2,
    before any model loads."""
    data = subject_set(tmp_path / "data")
    base = ["--base", str(tiny_sd1), "--resolution", "64", "--steps", "1"]
    cases = {
        ("--offload-blocks", "99", "--gradient-checkpointing"): "SD 1.x's denoiser has 6 transformer blocks",
        ("--offload-blocks", "-1", "--gradient-checkpointing"): "--offload-blocks -1: must be 0",
        ("--offload-blocks", "1"): "--offload-blocks 1: needs --gradient-checkpointing",
        ("--offload-blocks", "1", "--gradient-checkpointing", "--compile"): "can't be combined with --compile",
    }
    for args, message in cases.items():
        result = runner.invoke(app, ["train", str(data), str(tmp_path / "out"), *base, *args])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="--offload-blocks 2: FSDP already shards"):
        offload.check_accelerator(2, "DistributedType.FSDP")
    offload.check_accelerator(2, "DistributedType.MULTI_GPU")  # DDP: the offloaded weights are ignored (above)


def test_recommended_n_and_the_gpu_part(monkeypatch):
    """bench/offload_memory.py's arithmetic: Qwen-Image fp8 (0.3169 GiB a block, 0.0378 the rest) on a 24 GB card
    is N = 7, the smallest N whose resident weights + the allowance fit; gpu.sh's offload part is one command."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "bench"))
    import offload_memory as bench

    assert bench.recommend(0.3169, 0.0378, 24) == 7
    fits = [0.0378 + (62 - n) * 0.3169 + bench.ALLOWANCE_GIB <= 24 for n in (6, 7)]
    assert fits == [False, True]
    assert bench.recommend(0.3169, 0.0378, 4) == bench.FULL_DEPTH + 1  # nothing fits
    done = subprocess.run(["bash", str(root / "bench" / "gpu.sh"), "--dry-run", "offload"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout.split()[:5] == ["timeout", "170", "python3", "bench/offload_memory.py",
                                                                "--device"]  # fmt: skip


def train(data, out, base, *extra: str) -> dict[str, torch.Tensor]:
    args = ["--base", str(base), "--resolution", "64", "--rank", "4", "--lr", "1e-2", "--sample-every", "0",
            "--seed", "1", "--no-pivotal", "--preservation", "none", "--gradient-checkpointing", *extra]  # fmt: skip
    result = runner.invoke(app, ["train", str(data), str(out), *args])
    assert result.exit_code == 0, result.output
    assert ("offloading " in result.output) == ("--offload-blocks" in extra), result.output  # the hooks are on
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("family, blocks", [("sd1", "2"), ("qwenimage", "1")])
def test_lora_after_steps_equals_the_run_without_offloading(family, blocks, tiny_models, tmp_path):
    """2 steps with --offload-blocks give the LoRA of 2 steps without it (SD: the last 2 of the UNet's 6
    transformer blocks; Qwen-Image: the last of its 2). Qwen-Image's offloaded run is stopped at its step-1
    checkpoint and resumed (offloaded) to step 2."""
    data = subject_set(tmp_path / "data")
    base, out = tiny_models[family], tmp_path / "offloaded"
    straight = train(data, tmp_path / "straight", base, "--steps", "2", "--checkpoint-every", "0")
    offloaded = ["--offload-blocks", blocks]
    if family == "qwenimage":
        train(data, out, base, "--steps", "1", "--checkpoint-every", "1", *offloaded)
        offloaded += ["--resume", "latest"]
    moved = train(data, out, base, "--steps", "2", "--checkpoint-every", "0", *offloaded)
    assert straight.keys() == moved.keys()
    assert max(v.abs().max().item() for k, v in straight.items() if "lora_B" in k) > 1e-4  # it trained
    assert max((straight[k] - moved[k]).abs().max().item() for k in straight) <= 1e-6

"""FSDP2 through accelerate (`accelerate launch --config_file examples/accelerate/fsdp.yaml -m sdlora train ...`): the
frozen denoiser sharded over the processes, the LoRA trained and written as on one GPU.

accelerate shards the model in `prepare` (fsdp2_prepare_model: with TRANSFORMER_BASED_WRAP one FSDP unit per block
of the classes the model's `_no_split_modules` names, e.g. ZImageTransformerBlock, then the root). FSDP2 shards each
parameter on its own, so a block's frozen base weights and its fp32 LoRA weights share a unit (only the trained ones
must share a dtype). What sdlora adds is here: the settings FSDP can't take, the LoRA's full tensors while its files
are written (gathered from the shards, the LoRA only: never the multi-GB base), checkpoints in the one-process
format (so that a run resumes on any number of processes, one included), and accelerate's FSDP on the CPU (gloo).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sdlora.errors import UsageError


def sharded(accelerator: Any) -> bool:
    """True when accelerate runs FSDP2 (the launcher's config has distributed_type: FSDP, fsdp_version: 2)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def enable_on_cpu(accelerator: Any) -> None:
    """accelerate 1.15 turns FSDP on only on accelerators (state.py's FSDP branch lists MULTI_GPU, MULTI_XPU, ...
    but not MULTI_CPU) and runs an FSDP config on CPUs as plain data parallelism, while torch's `fully_shard` runs on
    the CPU with gloo. There, the launcher's FSDP settings are applied as accelerate applies them on a GPU, so that
    the CPU tests run the FSDP2 path users run."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as Accelerator() reads them
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState's own set-up ends


def report(accelerator: Any, denoiser: Any, label: str) -> None:
    """Under FSDP, one line on how the denoiser was sharded: its FSDP units by block class (the root holds the
    rest: embeddings, norms, the output layer)."""
    if not sharded(accelerator):
        return
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule

    units = Counter(type(m).__name__.removeprefix("FSDP") for m in denoiser.modules() if isinstance(m, FSDPModule))
    units[type(denoiser).__name__.removeprefix("FSDP")] -= 1  # the root
    blocks = ", ".join(f"{n} {name}" for name, n in units.items() if n > 0) or "none"
    accelerator.print(f"FSDP2: the {label} sharded over {accelerator.num_processes} processes; units: {blocks} + root")


def check(config: Any, accelerator: Any) -> None:
    """Settings FSDP can't take, refused in one line before any model loads (`config`: the settled settings)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not sharded(accelerator):
        raise UsageError("FSDP: sdlora trains with FSDP2; set fsdp_version: 2 in the accelerate config's fsdp_config")
    if not sharded(accelerator):
        return
    tc, lc, use_ddp = config.train, config.lora, "or launch without the FSDP config (DDP)"
    refusals = [
        (config.model.quantize != "none", f"--quantize {config.model.quantize}: FSDP2 shards floating-point weights, "
         "not bitsandbytes' or torchao's quantized ones; use --quantize none (FSDP shards the bf16 base over the "
         f"GPUs) {use_ddp}"),
        (lc.train_text_encoder, "--train-text-encoder: accelerate's FSDP2 prepares one model, the denoiser; leave "
         f"it off {use_ddp}"),
        (tc.pivotal, "--pivotal: its new token rows train in the text encoder, outside the sharded denoiser; pass "
         f"--no-pivotal {use_ddp}"),
        (tc.optimizer != "adamw", f"--optimizer {tc.optimizer}: FSDP is wired for AdamW's state (its tensors "
         f"sharded like their parameters); use --optimizer adamw {use_ddp}"),
        (tc.compile, f"--compile: torch.compile of the sharded denoiser is not supported here; leave it off {use_ddp}"),
        (bool(tc.eval_every), "--eval-every: identity scoring renders on the main process alone, which a sharded "
         "denoiser can't; pass --eval-every 0 and score checkpoints with `sdlora eval --lora CHECKPOINT`, "
         f"{use_ddp}"),
    ]  # fmt: skip
    for refused, message in refusals:
        if refused:
            raise UsageError(message)


@contextlib.contextmanager
def full_lora(accelerator: Any, denoiser: Any) -> Iterator[None]:
    """Under FSDP: each trained parameter's full tensor in place of its shard, on every process (a collective, so
    every process enters), for the LoRA writers to read whole tensors; the shards are back on exit. No forward and
    no load_state_dict may run inside (FSDP would take the full tensors for its shards). Nothing without FSDP."""
    if not sharded(accelerator):
        yield
        return
    import torch
    from torch.distributed.tensor import DTensor

    swapped = []
    for module in denoiser.modules():  # the same order on every process
        for name, shard in list(module._parameters.items()):
            if isinstance(shard, DTensor) and shard.requires_grad:
                full = torch.nn.Parameter(shard.full_tensor().detach(), requires_grad=True)
                module._parameters[name] = full
                swapped.append((module, name, shard))
    try:
        yield
    finally:
        for module, name, shard in swapped:
            module._parameters[name] = shard


class WholeOptimizer:
    """The optimizer as a one-process run has it, for accelerate's checkpoint writer and reader: state_dict()
    gathers each sharded state tensor whole (a collective: every process calls it, in the same order);
    load_state_dict() cuts whole tensors (of this run, or of a run on any number of processes) to this process's
    shards."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.tensor import DTensor

        state = self.optimizer.state_dict()
        for index in sorted(state["state"]):
            whole = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state["state"][index].items()}
            state["state"][index] = whole
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, entry in state["state"].items():
            p = params[int(index)]
            if not isinstance(p, DTensor):
                continue
            state["state"][index] = {
                k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                if torch.is_tensor(v) and v.shape == p.shape
                else v
                for k, v in entry.items()
            }
        self.optimizer.load_state_dict(state)


def save_state(accelerator: Any, name: str, denoiser: Any, optimizer: Any, scheduler: Any, folder: str) -> None:
    """accelerator.save_state's files under FSDP, on every process (accelerate's own FSDP checkpoint would write
    the whole sharded base): the LoRA whole (call inside full_lora) by the main process, the optimizer's state
    whole, the LR schedule and each process's RNG states, through accelerate's writer of the one-process format."""
    from accelerate.checkpointing import save_accelerator_state

    from sdlora.lora import peft
    from sdlora.train.checkpoint import LORA_STATE

    if accelerator.is_main_process:
        peft.save_state(Path(folder) / LORA_STATE, {name: denoiser})
    whole = [WholeOptimizer(optimizer)]
    args = (whole, [scheduler], [], accelerator.process_index, accelerator.step, accelerator.scaler)
    save_accelerator_state(folder, [], *args, save_on_each_node=False)


def load_state(accelerator: Any, name: str, denoiser: Any, optimizer: Any, scheduler: Any, folder: str) -> None:
    """accelerator.load_state under FSDP: a checkpoint written by any number of processes (save_state's, or a
    one-process run's) into the sharded LoRA and optimizer, the LR schedule and this process's RNG states (a
    process the writing run lacked keeps its own, as accelerate does)."""
    from accelerate.checkpointing import load_accelerator_state

    from sdlora.train.checkpoint import LORA_STATE

    _load_lora(Path(folder) / LORA_STATE, name, denoiser)
    whole = [WholeOptimizer(optimizer)]
    found = load_accelerator_state(folder, [], whole, [scheduler], [], accelerator.process_index, accelerator.scaler)
    accelerator.step = found.get("step", accelerator.step)


def _load_lora(path: Path, name: str, denoiser: Any) -> None:
    """peft.load_state into the sharded LoRA: each whole tensor cut to this process's shard first (FSDP2 shards
    every parameter alike, dim 0 over one mesh; every process read the same file, so no communication)."""
    import torch
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor

    trained = [p for p in denoiser.parameters() if isinstance(p, DTensor) and p.requires_grad]
    mesh, placements = trained[0].device_mesh, trained[0].placements
    if any(p.device_mesh != mesh or p.placements != placements for p in trained):
        raise RuntimeError("FSDP: the LoRA parameters are sharded unlike each other; resume with accelerate's FSDP2")
    prefix = f"{name}::"
    state = {
        key.removeprefix(prefix): distribute_tensor(value, mesh, placements, src_data_rank=None)
        for key, value in load_file(str(path)).items()
        if key.startswith(prefix)
    }
    with torch.no_grad():
        result = set_peft_model_state_dict(denoiser, state)
    if getattr(result, "unexpected_keys", []):
        raise RuntimeError(f"{path}: unexpected LoRA keys for {name}: {result.unexpected_keys[:3]}")


def saver(run: Any) -> Callable[[str], Any]:
    """What writes a checkpoint's state into a folder: save_state under FSDP, else accelerator.save_state."""
    acc = run.accelerator
    if not sharded(acc):
        return acc.save_state
    return functools.partial(save_state, acc, run.family.denoiser, run.denoiser, run.optimizer, run.lr_scheduler)


def loader(accelerator: Any, name: str, denoiser: Any, optimizer: Any, scheduler: Any) -> Callable[[str], Any] | None:
    """What reads a checkpoint folder back: load_state under FSDP, else None (accelerator.load_state)."""
    if not sharded(accelerator):
        return None
    return functools.partial(load_state, accelerator, name, denoiser, optimizer, scheduler)


def local(param: Any) -> Any:
    """This process's part of a parameter (its shard under FSDP; the parameter itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param

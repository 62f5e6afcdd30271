"""train.offload_blocks (--offload-blocks N): the last N transformer blocks of the frozen denoiser keep their base
weights in CPU RAM; each visits the compute device only while it runs, forward and backward.

The blocks are the denoiser's `_repeated_blocks` (diffusers' own list): QwenImageTransformerBlock,
FLUX.1's and klein's double- and single-stream blocks, Z-Image's refiner and main layers, and for the UNet families
(SD, SDXL) their BasicTransformerBlocks (most of a UNet's weights; its down/mid/up blocks are too few and too uneven
to swap). The last N in the order they run are offloaded: the first parameters (embedders) stay put, so the
model's `device` stays the compute device.

How: a forward pre-hook copies the block's frozen tensors (base weights and buffers) to the device and puts the
copies in the block's modules in place of the CPU ones; a forward hook (always called, also when gradient
checkpointing stops a recomputation early) puts the CPU tensors back and drops the copies. The copies are new
tensors: autograd keeps the ones it saved alive until backward used them, and frees them then. Gradient
checkpointing is required: it saves no weights in the forward pass and re-runs each block's forward (so its hooks)
just before that block's backward, so a block's copy lives from its recomputation to the end of its backward.
Without it autograd would keep every block's copy until the backward, and nothing would be saved. Trainable
tensors (the LoRA, with its gradients and optimizer state) are never touched: they live on the device. On CUDA the
copies are made on a side stream from pinned memory, the next block (forward: i+1, backward: i-1) while this one
computes. On the CPU the "copy" is a clone: nothing is saved there, but the same hooks, order and accounting run.

The accounting is the copies' own: each copy adds its bytes when made and a weakref finalizer takes them off when
the tensor is really freed (by us, or by autograd after the backward), so `resident`/`peak` are the base-weight
bytes of offloaded blocks on the device, and `static_bytes` the rest of the frozen denoiser that stays there.

Why not diffusers' group offloading (hooks/group_offloading.py, 0.42.1 and main): (1) block_level moves every
parameter of a group, so peft's LoRA tensors inside the blocks travel too: with use_stream it even copies them back
from a pinned snapshot taken when the hooks were applied, and their gradients and AdamW state stay on the device
while the weights sit in CPU RAM; (2) it moves tensors by assigning `.data`, which autograd's saved tensors share,
so anything saved for backward outside a checkpoint (the top-level module's own layers, offloaded by the top-level
group after the forward) is on the CPU when the backward needs it; (3) a recomputation stopped early (torch's
default) never calls its post-forward, so with checkpointing every block stays on the device after its backward
until the next forward: no saving at the step's peak; (4) it offloads every block of every ModuleList (no N).
Moving whole Parameters also breaks DDP (which wants all its parameters on one device type); here the offloaded
frozen tensors are told to DDP to ignore (ignore_in_ddp), and torch.compile is refused (the swaps would recompile).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from sdlora.errors import UsageError

OPTION = "--offload-blocks"


@dataclass
class Slot:
    """One frozen tensor of an offloaded block: where it sits (module and table), its CPU home and size."""

    owner: Any  # the nn.Module whose _parameters or _buffers holds it
    table: str  # "_parameters" | "_buffers"
    name: str
    home: Any  # the tensor in CPU RAM (pinned on CUDA where it is a plain tensor)
    nbytes: int


@dataclass
class BlockOffload:
    """The hooks' state: the offloaded blocks (their index is the execution order), the device copies in use and
    the one being prefetched, and the accounting."""

    names: list[str]
    blocks: list[Any]
    device: Any
    static_bytes: int = 0  # frozen denoiser bytes on the device outside the offloaded blocks (set by offload())
    resident: int = 0  # bytes of offloaded blocks' copies alive on the device now
    peak: int = 0  # the largest `resident` since reset_peak()
    trace: list[tuple[str, int]] | None = None  # ("on"|"off"|"prefetch", block index) when a test sets it to []
    slots: list[list[Slot]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    in_use: dict[int, list[Any]] = field(default_factory=dict)
    pending: tuple[int, list[Any], Any] | None = None  # (index, copies, CUDA event) of a prefetched block
    last: int | None = None
    direction: int = 1  # +1 in a forward pass, -1 while a backward recomputes the blocks in reverse
    stream: Any = None

    def reset_peak(self) -> None:
        self.peak = self.resident

    def resident_peak(self) -> int:
        """Bytes of base weights on the device at the peak since reset_peak(): the rest plus the copies."""
        return self.static_bytes + self.peak

    def remove(self) -> None:
        """Unhook the blocks (their frozen weights stay in CPU RAM)."""
        for handle in self.handles:
            handle.remove()
        for block in self.blocks:
            block.__dict__.pop("_apply", None)
        self.handles.clear()
        self.pending = None


# A UNet registers up_blocks before mid_block, and runs down, mid, up; a DiT's blocks run in module order.
RUN_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def repeated_blocks(denoiser: Any) -> list[tuple[str, Any]]:
    """(name, module) of the denoiser's transformer blocks (`_repeated_blocks` classes), in the order they run."""
    kinds = set(getattr(denoiser, "_repeated_blocks", None) or ())
    found: list[tuple[str, Any]] = []
    for name, module in denoiser.named_modules():
        if type(module).__name__ in kinds and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return sorted(found, key=lambda item: RUN_ORDER.get(item[0].split(".")[0], 0))  # stable: module order within


def check_settings(n: int, gradient_checkpointing: bool, compile_: bool) -> None:
    """The settings offloading can't work with, before any model loads."""
    if n and not gradient_checkpointing:
        raise UsageError(
            f"{OPTION} {n}: needs --gradient-checkpointing (without it the backward pass keeps every block's weights "
            "on the device and offloading saves nothing); add --gradient-checkpointing"
        )
    if n and compile_:
        raise UsageError(f"{OPTION} {n}: can't be combined with --compile (the weight swaps recompile); drop one")


def check_count(n: int, denoiser: Any, label: str) -> None:
    """N within the base's blocks (`denoiser`: the real one or one built on the meta device)."""
    available = len(repeated_blocks(denoiser))
    if n > available:
        raise UsageError(f"{OPTION} {n}: {label}'s denoiser has {available} transformer blocks; use 0 to {available}")


def check_accelerator(n: int, distributed_type: str) -> None:
    if n and "FSDP" in distributed_type.upper():
        raise UsageError(f"{OPTION} {n}: FSDP already shards (and can offload) the base; leave {OPTION} at 0 with FSDP")


def offload(denoiser: Any, n: int, device: Any) -> BlockOffload | None:
    """Keep the last `n` blocks' frozen tensors in CPU RAM and hook the blocks (before the LoRA is attached or the
    denoiser moves: later moves, `.to(device)` and accelerate.prepare's, leave those tensors home). None for n=0."""
    import torch

    if not n:
        return None
    check_count(n, denoiser, "the base")  # a single file without configs is counted only now
    blocks = repeated_blocks(denoiser)
    chosen = blocks[len(blocks) - n :]
    state = BlockOffload([name for name, _ in chosen], [block for _, block in chosen], torch.device(device))
    if state.device.type == "cuda":
        state.stream = torch.cuda.Stream(state.device)
    for index, block in enumerate(state.blocks):
        state.slots.append([])
        _send_home(state, index, block)
        _keep_frozen_home(state, block)
        state.handles.append(block.register_forward_pre_hook(_pre_hook(state, index)))
        state.handles.append(block.register_forward_hook(_post_hook(state, index), always_call=True))
    inside = {id(m) for block in state.blocks for m in block.modules()}
    state.static_bytes = sum(
        nbytes(getattr(m, t)[n]) for m in denoiser.modules() if id(m) not in inside for _, t, n in _frozen(m, False)
    )
    denoiser._sdlora_offload = state  # found again by state_of(), also through Accelerate's and DDP's wrappers
    return state


def adopt(state: BlockOffload | None) -> None:
    """After the adapters are attached: frozen tensors that joined the offloaded blocks since offload() (a frozen
    training adapter's LoRA) go home and travel with the block too."""
    if state is None:
        return
    for index, block in enumerate(state.blocks):
        known = {(id(s.owner), s.table, s.name) for s in state.slots[index]}
        _send_home(state, index, block, skip=known)


def describe(state: BlockOffload | None) -> str | None:
    """The log line of an offloaded run, or None."""
    if state is None:
        return None
    home = sum(slot.nbytes for slots in state.slots for slot in slots)
    return (
        f"offloading {len(state.blocks)} transformer blocks: {home / 2**30:.2f} GiB of base weights in CPU RAM, "
        f"{state.static_bytes / 2**30:.2f} GiB on the device"
    )


def state_of(denoiser: Any) -> BlockOffload | None:
    """The offloading state of a denoiser (unwrapped or not), or None."""
    return getattr(getattr(denoiser, "module", denoiser), "_sdlora_offload", None)


def ignore_in_ddp(state: BlockOffload | None, denoiser: Any) -> None:
    """DDP checks that all its parameters share a device type and broadcasts them: the offloaded frozen tensors
    (identical in every process, never trained) are left out of both. Call after the LoRA is attached."""
    if state is None:
        return
    from torch.nn.parallel import DistributedDataParallel

    inside = {id(m) for block in state.blocks for m in block.modules()}
    names = [f"{prefix}.{name}" if prefix else name for prefix, m in denoiser.named_modules() if id(m) in inside
             for _, _, name in _frozen(m, recurse=False)]  # fmt: skip
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(denoiser, names)


def nbytes(tensor: Any) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's Float8Tensor: data and scales) by its inner tensors."""
    parts = _inner(tensor)
    return sum(t.numel() * t.element_size() for t in parts) if parts else tensor.numel() * tensor.element_size()


def _inner(tensor: Any) -> list[Any] | None:
    """The plain tensors a tensor is made of: itself, or a traceable subclass's inner tensors (torchao's); None for
    other subclasses (bitsandbytes' Params4bit keeps its scales in an attribute: copied on the compute stream)."""
    import torch

    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return [tensor]
    if not hasattr(tensor, "__tensor_flatten__"):
        return None
    parts = [_inner(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0]]
    return None if any(p is None for p in parts) else [t for p in parts for t in p]


def _pinned(tensor: Any) -> Any:
    """`tensor` in pinned CPU memory (a torchao subclass rebuilt from pinned inner tensors), else as it is."""
    import torch

    try:
        if type(tensor) in (torch.Tensor, torch.nn.Parameter):
            return tensor.detach().pin_memory()
        if _inner(tensor) is not None:
            names, context = tensor.__tensor_flatten__()
            inner = {name: _pinned(getattr(tensor, name)) for name in names}
            return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        pass  # unpinned: its copies are synchronous, still correct
    return tensor


def _frozen(module: Any, recurse: bool = True) -> list[tuple[Any, str, str]]:
    """(owner, table, name) of the frozen tensors (parameters that need no gradient, and buffers) of `module`."""
    found = []
    for owner in module.modules() if recurse else [module]:
        for table in ("_parameters", "_buffers"):
            for name, tensor in getattr(owner, table).items():
                if tensor is not None and (table == "_buffers" or not tensor.requires_grad):
                    found.append((owner, table, name))
    return found


def _send_home(state: BlockOffload, index: int, block: Any, skip: set[tuple[int, str, str]] | None = None) -> None:
    """The block's frozen tensors (but those in `skip`) into CPU RAM (pinned for async copies on CUDA)."""
    import torch

    for owner, table, name in _frozen(block):
        if skip and (id(owner), table, name) in skip:
            continue
        tensor = getattr(owner, table)[name]
        home = tensor.to("cpu")
        if state.stream is not None:
            home = _pinned(home)
        if isinstance(tensor, torch.nn.Parameter) and not isinstance(home, torch.nn.Parameter):
            home = torch.nn.Parameter(home, requires_grad=False)
        getattr(owner, table)[name] = home
        state.slots[index].append(Slot(owner, table, name, home, nbytes(home)))


def _keep_frozen_home(state: BlockOffload, block: Any) -> None:
    """`.to()`/`.cuda()`/`.half()` of the block (or any module above it) move its trainable tensors only: the
    frozen ones are hidden from nn.Module._apply while it runs."""
    cls_apply = type(block)._apply

    def _apply(fn: Any, recurse: bool = True) -> Any:
        hidden = [(o, t, n, getattr(o, t)[n]) for o, t, n in _frozen(block)]
        for owner, table, name, _ in hidden:
            getattr(owner, table)[name] = None
        try:
            return cls_apply(block, fn, recurse)
        finally:
            for owner, table, name, tensor in hidden:
                getattr(owner, table)[name] = tensor

    block._apply = _apply


def _pre_hook(state: BlockOffload, index: int) -> Any:
    def hook(_module: Any, _args: Any) -> None:
        _onload(state, index)

    return hook


def _post_hook(state: BlockOffload, index: int) -> Any:
    def hook(_module: Any, _args: Any, _output: Any) -> None:
        _offload(state, index)

    return hook


def _onload(state: BlockOffload, index: int) -> None:
    """Block `index`'s copies into its modules (the prefetched ones if they are this block's), then prefetch the
    next block in this pass's direction."""
    import torch

    if state.last is not None:  # the same block twice running: the backward's recomputation turned the order
        state.direction = 1 if index > state.last else -1 if index < state.last else -state.direction
    state.last = index
    if state.pending is not None and state.pending[0] == index:
        _, copies, event = state.pending
    else:
        copies, event = _copies(state, index)
    state.pending = None
    if event is not None:
        compute = torch.cuda.current_stream(state.device)
        compute.wait_event(event)
        for part in (t for copy in copies for t in _inner(copy) or ()):
            part.record_stream(compute)  # freed after the compute stream's last use, not the side stream's
    for slot, copy in zip(state.slots[index], copies, strict=True):
        getattr(slot.owner, slot.table)[slot.name] = copy
    state.in_use[index] = copies
    _note(state, "on", index)
    following = index + state.direction
    if 0 <= following < len(state.blocks) and following not in state.in_use:
        state.pending = (following, *_copies(state, following))
        _note(state, "prefetch", following)


def _offload(state: BlockOffload, index: int) -> None:
    """The CPU tensors back into the block's modules; the copies are dropped (autograd may still hold some)."""
    for slot in state.slots[index]:
        getattr(slot.owner, slot.table)[slot.name] = slot.home
    state.in_use.pop(index, None)
    _note(state, "off", index)


def _copies(state: BlockOffload, index: int) -> tuple[list[Any], Any]:
    """Device copies of block `index`'s frozen tensors, counted until freed; on CUDA copied on the side stream
    (returns its event), but for bitsandbytes' tensors (on the current one)."""
    import torch

    copies, event = [], None
    for slot in state.slots[index]:
        if state.stream is not None and _inner(slot.home) is not None:
            with torch.cuda.stream(state.stream):
                copy = slot.home.detach().to(state.device, non_blocking=True)
        elif state.device.type == "cpu":
            copy = slot.home.detach().clone()
        else:
            copy = slot.home.detach().to(state.device)
        copies.append(copy)
        _count(state, copy, slot.nbytes)
    if state.stream is not None:
        event = torch.cuda.Event()
        event.record(state.stream)
    return copies, event


def _count(state: BlockOffload, copy: Any, size: int) -> None:
    state.resident += size
    state.peak = max(state.peak, state.resident)
    weakref.finalize(copy, _freed, weakref.ref(state), size)


def _freed(ref: Any, size: int) -> None:
    state = ref()
    if state is not None:
        state.resident -= size


def _note(state: BlockOffload, what: str, index: int) -> None:
    if state.trace is not None:
        state.trace.append((what, index))

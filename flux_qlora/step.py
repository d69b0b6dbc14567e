"""The GPU machinery of one training step, each part a no-op when its flag is off, so the loop never branches:

- `FlatLora`: the LoRA weights as one flat fp32 buffer (one optimizer tensor) with a low-precision compute copy;
- `offload_activations`: what autograd keeps for the backward waits in pinned CPU memory instead of on the GPU;
- `in_cuda_graph`: the micro step (forward, backward, gradient gather) captured once and replayed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from flux_qlora.cuda_graphs import CudaGraphStep
from flux_qlora.errors import UserError


class FlatLora:
    """All LoRA weights in one flat fp32 buffer, `master`: the optimizer's only parameter, so the optimizer step and
    gradient clipping run a handful of kernels instead of kernels for each of the ~760 small LoRA tensors of Flux.

    With `compute_dtype` bf16/fp16 (mixed precision, one process) the model's LoRA weights are views of a flat copy
    in that dtype, refreshed after each optimizer step by one copy: the compiled blocks then take them as they are
    instead of casting each weight in every graph (~1,100 tiny cast kernels per Flux step). The values the model
    computes with are the same as autocast's casts; gradients are added into `master.grad` in fp32 every micro
    step. Otherwise (fp32, or DDP, which reduces the weights' own gradients) the weights are views of `master`.
    """

    def __init__(self, params: list[nn.Parameter], compute_dtype: torch.dtype = torch.float32):
        self.params = params
        self.master = nn.Parameter(torch.cat([p.detach().float().reshape(-1) for p in params]))
        self.compute = self.master.detach().to(compute_dtype) if compute_dtype != torch.float32 else None
        if self.compute is not None:  # allocated once and zeroed in place: a CUDA graph adds into this address
            self.master.grad = torch.zeros_like(self.master)
        self._view_params(self.compute if self.compute is not None else self.master.data)

    def _view_params(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            p.data = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def after_backward(self) -> None:
        """Inside the micro step: with a compute copy, its gradients go into master.grad at once (GPU work only, so
        a CUDA graph captures it with the backward)."""
        if self.compute is not None:
            self.gather_grads()

    def before_optimizer_step(self) -> None:
        """Without a compute copy, master.grad is gathered once, from the gradients accumulated in the weights."""
        if self.compute is None:
            self.gather_grads()

    def gather_grads(self) -> None:
        """master.grad (+)= the LoRA weights' gradients in fp32; the weights' own are cleared when they are copies."""
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        if self.compute is None:
            self.master.grad = grads
            return
        self.master.grad.add_(grads)
        for p in self.params:
            p.grad = None

    def zero_grad(self) -> None:
        if self.compute is not None:
            self.master.grad.zero_()
            return
        self.master.grad = None
        for p in self.params:
            p.grad = None

    def sync(self) -> None:
        """After an optimizer step (or loading): the compute copy takes the master weights."""
        if self.compute is not None:
            self.compute.copy_(self.master.detach())

    @contextmanager
    def master_weights(self):
        """The model's LoRA weights as views of the fp32 master while inside: to save or load them exactly."""
        if self.compute is None:
            yield
            return
        with self.viewing(self.master.data):
            yield

    @contextmanager
    def viewing(self, flat: torch.Tensor):
        """The model's LoRA weights as views of `flat` (a buffer of master's layout, e.g. the EMA) while inside."""
        self._view_params(flat)
        try:
            yield
        finally:
            self._view_params(self.compute if self.compute is not None else self.master.data)
            self.sync()


@dataclass
class _Offloaded:
    host: torch.Tensor
    ready: torch.cuda.Event | None = None  # the copy in either direction is done
    fetched: torch.Tensor | None = None  # prefetched back to the GPU


class ActivationOffload:
    """A reusable context (enter it around each forward) whose saved_tensors_hooks copy large saved tensors to
    pinned CPU memory on a side stream during the forward and bring them back during the backward, each one
    prefetched while the block after it is being processed (the backward visits blocks in reverse order). Weights,
    small and non-contiguous tensors stay where they are.

        offload = ActivationOffload(model, device)
        with offload:
            loss = model(...)
        loss.backward()
    """

    def __init__(self, model: nn.Module, device: torch.device, min_bytes: int = 1 << 20):
        self.model, self.device, self.min_bytes = model, device, min_bytes
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.entries: list[_Offloaded] = []
        self.seen: dict[int, tuple[weakref.ref, int]] = {}
        self.keep: set[int] = set()
        self._hooks = None

    def __enter__(self) -> ActivationOffload:
        self.entries, self.seen = [], {}
        if not self.keep:  # the weights' storages don't move during training: listed once, not every step
            self.keep = {t.untyped_storage().data_ptr() for t in [*self.model.parameters(), *self.model.buffers()]}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        if (tensor.device.type != self.device.type or not tensor.is_contiguous()
                or tensor.numel() * tensor.element_size() < self.min_bytes
                or tensor.untyped_storage().data_ptr() in self.keep):
            return tensor
        # A tensor saved by several ops (e.g. the rotary embedding, by every block) is copied once; the weak
        # reference tells a live tensor from a new one at a recycled id.
        ref, index = self.seen.get(id(tensor), (None, None))
        if ref is None or ref() is not tensor:
            index = len(self.entries)
            self.entries.append(self._to_host(tensor))
            self.seen[id(tensor)] = (weakref.ref(tensor), index)
        return index

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        tensor = self._fetch(packed)
        if packed > 0:
            self._fetch(packed - 1, prefetch=True)
        return tensor

    def _to_host(self, tensor: torch.Tensor) -> _Offloaded:
        if self.stream is None:
            return _Offloaded(tensor.clone())
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # not reused by the allocator before the copy is done
        return _Offloaded(host, self.stream.record_event())

    def _fetch(self, index: int, prefetch: bool = False) -> torch.Tensor | None:
        entry = self.entries[index]
        if self.stream is None:
            return None if prefetch else entry.host
        if entry.fetched is None:
            with torch.cuda.stream(self.stream):
                entry.fetched = entry.host.to(self.device, non_blocking=True)
                entry.ready = self.stream.record_event()
        if prefetch:
            return None
        tensor, entry.fetched = entry.fetched, None
        current = torch.cuda.current_stream(self.device)
        current.wait_event(entry.ready)
        tensor.record_stream(current)
        return tensor


class LoraEma:
    """An exponential moving average of the LoRA weights, kept in one flat fp32 buffer beside FlatLora's master:
    each update is one kernel (shadow += (1 - decay) * (master - shadow)). Checkpointed through accelerate
    (`state_dict` / `load_state_dict`), so a resumed run's EMA is the uninterrupted run's."""

    def __init__(self, flat_lora: FlatLora, decay: float):
        self.flat_lora, self.decay = flat_lora, decay
        self.shadow = flat_lora.master.detach().clone()

    @torch.no_grad()
    def update(self) -> None:
        self.shadow.lerp_(self.flat_lora.master.detach(), 1 - self.decay)

    def weights(self):
        """The model's LoRA weights are the EMA's while inside (to save it, or to draw validation images)."""
        return self.flat_lora.viewing(self.shadow)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.copy_(state["shadow"])


class NoEma:
    """--use_ema off: updating does nothing and the weights are the trained ones."""

    def update(self) -> None:
        pass

    def weights(self):
        return nullcontext()


def lora_compute_dtype(num_processes: int, weight_dtype: torch.dtype) -> torch.dtype:
    """FlatLora's compute copy: DDP reduces the weights' own (fp32) gradients, so a low-precision copy is for one
    process only."""
    return weight_dtype if num_processes == 1 else torch.float32


def make_optimizer(params: list[nn.Parameter], eight_bit: bool, **adamw) -> torch.optim.Optimizer:
    """AdamW over the flat LoRA master: bitsandbytes' 8-bit AdamW (--use_8bit_adam) or torch's."""
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **adamw)
    return torch.optim.AdamW(params, **adamw)


def offload_activations(model: nn.Module, device: torch.device, enabled: bool) -> AbstractContextManager:
    """A context to enter around each forward: `ActivationOffload`, or a no-op when disabled."""
    return ActivationOffload(model, device) if enabled else nullcontext()


def check_cuda_graphs(device: torch.device, num_processes: int, compute_dtype: torch.dtype) -> None:
    if device.type != "cuda":
        raise UserError("--cuda_graphs needs an NVIDIA GPU (no CUDA device here): drop the flag.")
    if num_processes > 1 or compute_dtype != torch.bfloat16:
        # fp16 means loss scaling, whose skipped steps and scale updates are not measured under a graph yet.
        raise UserError("--cuda_graphs runs on one GPU with --mixed_precision bf16 (this run: "
                        f"{num_processes} processes, {str(compute_dtype).removeprefix('torch.')}): drop the flag.")


def in_cuda_graph(micro_step: Callable[..., torch.Tensor], enabled: bool) -> Callable[..., torch.Tensor]:
    """The micro step replayed from a CUDA graph after two eager warm-up calls (`CudaGraphStep`), or as it is."""
    return CudaGraphStep(micro_step) if enabled else micro_step

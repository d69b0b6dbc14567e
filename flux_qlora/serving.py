"""Serving LoRAs through one pipeline: infer.py's serve() generates one round per entry of `server.rounds`,
calling `server.swap(i)` before round i, and never asks which kind of server it has.

- `BlendedLoras`: one round, every --lora loaded at its scale (and fused, with --fuse): nothing to swap.
- `AdapterSwap` (--hotswap adapter): peft's hotswap; the LoRA layers stay and each swap copies the next LoRA's
  weights into them in place: exact LoRA maths, no recompiles, but the LoRA layers' cost per image (BENCHMARKS.md),
  and the swapped-in LoRAs must target layers the first one did.
- `FusedLoraSwap` (--hotswap fused): each LoRA merged into the weights in place when swapped in.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from flux_qlora.errors import UserError
from flux_qlora.lora import LoraFile, check_layer_fits, layers

logger = logging.getLogger(__name__)

Delta = tuple[torch.Tensor, torch.Tensor, float]  # (lora_A, lora_B, scale): the weight delta is scale * B @ A


@dataclass
class Lora:
    source: str  # as given on the command line
    file: LoraFile  # read once: every server uses its tensors
    rank: int
    scale: float
    adapter_name: str


class LoraServer(Protocol):
    rounds: list[str]  # what each round serves, as its images and timings are labelled

    def start(self) -> None:
        """Once the pipeline is on its device, before FP8 quantization and compilation: round 0 in place."""

    def use_fp8(self, config) -> None:
        """The transformer was just quantized to FP8 with this torchao config."""

    def swap(self, index: int) -> None:
        """Round `index`'s LoRA(s) in place of the current ones."""


def make_server(mode: str | None, pipe, loras: list[Lora], target_rank: int | None) -> LoraServer:
    """The server of --hotswap `mode` (None: no hotswap), its first LoRA(s) loaded."""
    if mode == "fused":
        return FusedLoraSwap(pipe.transformer, loras)
    if mode == "adapter":
        return AdapterSwap(pipe, loras, target_rank)
    return BlendedLoras(pipe, loras)


class BlendedLoras:
    """Every LoRA loaded as its own adapter and weighted by its scale (`set_adapters`): one round."""

    def __init__(self, pipe, loras: list[Lora]):
        for lora in loras:
            _load(pipe, lora)
        if loras:
            pipe.set_adapters([lo.adapter_name for lo in loras], adapter_weights=[lo.scale for lo in loras])
        self.rounds = ["+".join(f"{lo.source}@{lo.scale:g}" for lo in loras) or "base"]

    def start(self) -> None:
        pass

    def use_fp8(self, config) -> None:
        pass

    def swap(self, index: int) -> None:
        pass


class AdapterSwap:
    """peft's hotswap: LoRA slots of up to `target_rank` made for the first LoRA; a swap copies another LoRA's
    weights and scale into them in place."""

    def __init__(self, pipe, loras: list[Lora], target_rank: int):
        self.pipe, self.loras = pipe, loras
        self.rounds = [lora.source for lora in loras]
        pipe.enable_lora_hotswap(target_rank=target_rank)
        _load(pipe, loras[0])
        self.current = 0

    def start(self) -> None:
        move_lora_scalings(self.pipe.transformer, self.pipe.transformer.device)

    def use_fp8(self, config) -> None:
        pass  # the base layers are quantized, the LoRA layers stay in bf16: nothing to redo at a swap

    def swap(self, index: int) -> None:
        if index == self.current:
            return
        self.pipe.load_lora_weights(**_weights(self.loras[index].file), hotswap=True,
                                    adapter_name=self.loras[0].adapter_name)
        self.current = index


def _load(pipe, lora: Lora) -> None:
    pipe.load_lora_weights(**_weights(lora.file), adapter_name=lora.adapter_name)
    logger.info("LoRA %s (rank %d) loaded as %s", lora.source, lora.rank, lora.adapter_name)


def _weights(file: LoraFile) -> dict:
    """What diffusers' `load_lora_weights` loads: the tensors already read, copied (peft adopts the tensors it is
    given as the adapter's weights, and a hotswap writes into them). A file with a LoRA config (alpha, rsLoRA) in
    its metadata is given as a file: diffusers reads that config from a file only, never with a state dict."""
    if file.adapter_metadata is None:
        return {"pretrained_model_name_or_path_or_dict": {k: v.clone() for k, v in file.tensors.items()}}
    return {"pretrained_model_name_or_path_or_dict": str(file.path.parent), "weight_name": file.path.name}


def move_lora_scalings(transformer: torch.nn.Module, device: torch.device) -> None:
    """Hotswap keeps each LoRA scale in a tensor (swaps then fill it in place, no recompiling) made where the
    weights were at load time, and `.to()` does not move it: left on the CPU, a CUDA graph would bake in the first
    LoRA's scale."""
    for module in transformer.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name, value in scaling.items():
                if isinstance(value, torch.Tensor):
                    scaling[name] = value.to(device)


def read_lora_deltas(file: LoraFile) -> dict[str, Delta]:
    """Layer name -> (A, B, scale) for a LoRA in any format diffusers reads for Flux (converted by diffusers),
    with the scale peft would use: alpha / rank (alpha / sqrt(rank) for rsLoRA), alpha from the saved LoRA config,
    else from `.alpha` tensors, else alpha = rank (scale 1)."""
    from diffusers import FluxPipeline
    from peft.utils.other import get_pattern_key

    # a copy: diffusers pops the `.alpha` tensors out of the dict it is given. FLUX.1's loader reads every layout
    # of FLUX.1 LoRAs; a diffusers-layout FLUX.2 LoRA (ours) passes through it unchanged.
    state, alphas = FluxPipeline.lora_state_dict(dict(file.tensors), return_alphas=True)
    config = {k.removeprefix("transformer."): v for k, v in (file.adapter_metadata or {}).items()}
    if config.get("use_dora") or any(".lora_magnitude_vector" in k or ".lora_B.bias" in k for k in state):
        raise UserError(f"LoRA {file.path} uses DoRA or LoRA biases, which --hotswap fused doesn't merge: "
                        "use --hotswap (adapter).")
    deltas = {}
    for name, (a, b) in layers(state, f"LoRA {file.path}").items():
        rank = a.shape[0]
        if config:
            alpha_pattern = config.get("alpha_pattern") or {}
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha", rank))
        else:
            alpha = float((alphas or {}).get(f"transformer.{name}.alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas[name] = (a, b, scale)
    if not deltas:
        raise UserError(f"LoRA {file.path} holds no transformer LoRA layers that --hotswap fused can merge.")
    return deltas


class FusedLoraSwap:
    """Serves LoRAs one at a time, each merged into the weights of the layers any of them targets: no LoRA layers
    run, any ranks and layers, and a swap changes no shape or address (no recompiles; a captured CUDA graph stays
    valid). FP8 (torchao) weights are re-quantized from the merged bf16 weights, as fusing and then quantizing
    would.

    Keeps the original weights of those layers in (pinned) CPU memory: for LoRAs on the attention projections of
    FLUX.1-dev, 190 layers, 3.6 GB.
    """

    def __init__(self, transformer: nn.Module, loras: list[Lora]):
        self.transformer, self.loras = transformer, loras
        self.rounds = [lora.source for lora in loras]
        self.deltas = [read_lora_deltas(lora.file) for lora in loras]
        modules = dict(transformer.named_modules())
        self.layers = {name: check_layer_fits(lora.file.path, name, modules.get(name), a.shape[1], b.shape[0])
                       for lora, deltas in zip(loras, self.deltas) for name, (a, b, _) in deltas.items()}
        pin = torch.cuda.is_available()
        self.originals = {name: self._copy(layer.weight, pin) for name, layer in self.layers.items()}
        self.fp8_config = None
        self.current: int | None = None
        size = sum(t.numel() * t.element_size() for t in self.originals.values()) / 2**30
        logger.info("--hotswap fused: original weights of %d layers kept in CPU memory (%.1f GiB)", len(self.layers),
                    size)

    def start(self) -> None:
        """The first LoRA merged where the weights now are (on the GPU), before any FP8 quantization."""
        self.swap(0)

    def use_fp8(self, config) -> None:
        """The transformer was just quantized with `config`: later swaps re-quantize the merged weights with it."""
        self.fp8_config = config

    @staticmethod
    def _copy(weight: torch.Tensor, pin: bool) -> torch.Tensor:
        copy = weight.detach().to("cpu", copy=True)
        return copy.pin_memory() if pin else copy

    @torch.no_grad()
    def swap(self, index: int) -> None:
        """Merges LoRA `index` (the others' layers get their original weights back)."""
        if index == self.current:
            return
        start = time.perf_counter()
        deltas = self.deltas[index]
        for name, layer in self.layers.items():
            device, original = layer.weight.device, self.originals[name]
            if name in deltas:  # merged in fp32, rounded once
                a, b, scale = deltas[name]
                # copied over in bf16, widened on the device; a copy even on the CPU, so the originals stay
                merged = original.to(device, non_blocking=True).to(torch.float32, copy=True)
                weight = merged.addmm_(b.to(device, torch.float32), a.to(device, torch.float32), alpha=scale)
                weight = weight.to(original.dtype)
            else:
                weight = original.to(device, non_blocking=True)
            self._write(layer, weight)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.current = index
        logger.info("Fused LoRA %s into %d layers in %.2f s", self.loras[index].source, len(deltas),
                    time.perf_counter() - start)

    def _write(self, layer: nn.Linear, weight: torch.Tensor) -> None:
        if self.fp8_config is not None and hasattr(layer.weight, "qdata"):
            from torchao.quantization import quantize_

            fresh = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
            fresh.weight = nn.Parameter(weight, requires_grad=False)
            quantize_(fresh, self.fp8_config)
            layer.weight.qdata.copy_(fresh.weight.qdata)
            layer.weight.scale.copy_(fresh.weight.scale)
        else:
            layer.weight.copy_(weight)

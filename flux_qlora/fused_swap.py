"""Hotswapping by fusing: each LoRA is merged into the transformer's weights in place, from a copy of the original
weights, so serving a LoRA costs nothing per image (no LoRA layers run) and a swap changes no shape or address:
no recompilation, and a captured CUDA graph stays valid. FP8 (torchao) weights are re-quantized from the merged
bf16 weights, as fusing and then quantizing would.

peft's hotswap (`enable_lora_hotswap`) keeps the LoRA layers: exact bf16 LoRA maths, but ~7% more time per
image on FLUX.1-dev at 1024x1024 (BENCHMARKS.md), and the swapped-in LoRAs must target layers the first one did.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from flux_qlora.data import UserError

logger = logging.getLogger(__name__)

Delta = tuple[torch.Tensor, torch.Tensor, float]  # (lora_A, lora_B, scale): the weight delta is scale * B @ A


def read_lora_deltas(file: Path) -> dict[str, Delta]:
    """Layer name -> (A, B, scale) for a LoRA in any format diffusers reads for Flux (converted by diffusers),
    with the scale peft would use: alpha / rank (alpha / sqrt(rank) for rsLoRA), alpha from the saved LoRA config,
    else from `.alpha` tensors, else alpha = rank (scale 1)."""
    from diffusers import FluxPipeline
    from peft.utils.other import get_pattern_key

    state, alphas, metadata = FluxPipeline.lora_state_dict(str(file.parent), weight_name=file.name,
                                                           return_alphas=True, return_lora_metadata=True)
    config = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    if config.get("use_dora") or any(".lora_magnitude_vector" in k or ".lora_B.bias" in k for k in state):
        raise UserError(f"LoRA {file} uses DoRA or LoRA biases, which --hotswap fused doesn't merge: "
                        "use --hotswap (adapter).")
    deltas = {}
    for key, a in state.items():
        if not key.startswith("transformer.") or not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        b, rank = state[f"transformer.{name}.lora_B.weight"], a.shape[0]
        if config:
            alpha_pattern = config.get("alpha_pattern") or {}
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha", rank))
        else:
            alpha = float((alphas or {}).get(f"transformer.{name}.alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas[name] = (a, b, scale)
    if not deltas:
        raise UserError(f"LoRA {file} holds no transformer LoRA layers that --hotswap fused can merge.")
    return deltas


class FusedLoraSwap:
    """Serves LoRAs one at a time, each merged into the weights of the layers any of them targets.

    Keeps the original weights of those layers in (pinned) CPU memory: for LoRAs on the attention projections of
    FLUX.1-dev, 190 layers, 3.6 GB. `fp8_config`: set once the transformer is quantized with it, so swaps
    re-quantize the merged weights the same way.
    """

    def __init__(self, transformer: nn.Module, files: list[Path]):
        self.transformer, self.files = transformer, files
        self.deltas = [read_lora_deltas(file) for file in files]
        modules = dict(transformer.named_modules())
        self.layers = {name: self._linear(modules.get(name), name, file, delta)
                       for file, deltas in zip(files, self.deltas) for name, delta in deltas.items()}
        pin = torch.cuda.is_available()
        self.originals = {name: self._copy(layer.weight, pin) for name, layer in self.layers.items()}
        self.fp8_config = None
        size = sum(t.numel() * t.element_size() for t in self.originals.values()) / 2**30
        logger.info("--hotswap fused: original weights of %d layers kept in CPU memory (%.1f GiB)", len(self.layers),
                    size)

    @staticmethod
    def _linear(layer: nn.Module | None, name: str, file: Path, delta: Delta) -> nn.Linear:
        a, b, _ = delta
        if not isinstance(layer, nn.Linear) or (layer.out_features, layer.in_features) != (b.shape[0], a.shape[1]):
            found = "no such linear layer" if not isinstance(layer, nn.Linear) else \
                f"{layer.in_features} -> {layer.out_features}"
            raise UserError(f"LoRA {file} doesn't fit this transformer: layer {name} is {a.shape[1]} -> "
                            f"{b.shape[0]} in the LoRA, {found} in the model. Is it a LoRA for another model?")
        return layer

    @staticmethod
    def _copy(weight: torch.Tensor, pin: bool) -> torch.Tensor:
        copy = weight.detach().to("cpu", copy=True)
        return copy.pin_memory() if pin else copy

    @torch.no_grad()
    def swap(self, index: int) -> None:
        """Merges LoRA `index` (the others' layers get their original weights back)."""
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
        logger.info("Fused LoRA %s into %d layers in %.2f s", self.files[index], len(deltas),
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

"""The memory plan: a training run's peak GPU memory and system RAM, predicted before anything loads.

Weights and LoRA state are counted exactly from the transformer's config (a skeleton on the meta device). The
activations are a model in the token count whose constants each family fits to its measured peaks
(`Family.activations`; bf16 compute, `--compile --cuda_graphs`, BENCHMARKS.md): with checkpointing the peak holds
each checkpointed block's input plus one block's recomputed activations, without it every block's activations:

    activations = WORKSPACE + tokens x batch x (checkpointed blocks x CKPT_INPUT + other blocks x BLOCK + BLOCK)

per token and hidden unit, so other widths of a family scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from flux_qlora.errors import UserError
from flux_qlora.families import Family, from_transformer_config
from flux_qlora.hardware import Device
from flux_qlora.lora import is_target

GIB = 2**30
# Encoding the latents: the VAE's weights (FLUX.1's and FLUX.2's encoders alike: 128-512 channels, ~84 M parameters
# in all) and its encoder's activations per image pixel in bf16, measured: four 1024x1024 images at once peaked at
# 6.24 GiB on an H100 (batches.encode_latents now encodes one at a time).
VAE_GIB = 0.16
VAE_ENCODE_BYTES_PER_PIXEL = 1557
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # two codes per byte + 8-bit block scales + fp32 second-level scales
PROCESS_RAM_GIB = 3.0  # Python, torch, CUDA context and libraries in system RAM (estimate)


@dataclass
class MemoryPlan:
    weights_gib: float
    lora_gib: float  # LoRA weights, gradients and optimizer state
    activations_gib: float  # the step's (with the VAE and its encoding when latents are encoded each step)
    ram_gib: float  # system RAM: the process plus the data held in memory
    caching_gib: float = 0.0  # the VAE encoding one image, before the transformer loads (latents cached)

    @property
    def peak_gib(self) -> float:
        return max(self.weights_gib + self.lora_gib + self.activations_gib, self.caching_gib)

    def describe(self) -> str:
        caching = (f"; caching the latents ~{self.caching_gib:.1f} GiB, before the model loads" if self.caching_gib
                   else "")
        return (f"GPU peak ~{self.peak_gib:.1f} GiB (weights {self.weights_gib:.2f}, LoRA + optimizer "
                f"{self.lora_gib:.2f}, activations {self.activations_gib:.2f}{caching}); system RAM "
                f"~{self.ram_gib:.1f} GiB")


@dataclass
class TrainingShape:
    """What the plan depends on, in the trainer's flags' terms."""

    width: int
    height: int
    text_tokens: int
    batch_size: int = 1
    nf4: bool = True
    compute_bytes: int = 2  # bf16/fp16 compute; 4 for fp32
    rank: int = 4
    targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    eight_bit_adam: bool = True
    gradient_checkpointing: bool = True
    checkpointing_interval: int = 1
    offload_activations: bool = False
    num_images: int = 0
    latents: str = "memory"  # cached in RAM; "disk": cached in files (read per batch); "none": pixels in RAM


def _skeleton(config: dict, family: Family) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return family.transformer_cls().from_config(config)


def plan_training(config: dict, shape: TrainingShape) -> MemoryPlan:
    """The predicted peak of a training run on a transformer of `config` (a FLUX.1 or FLUX.2 transformer's
    config.json)."""
    from flux_qlora.models import quantized_prefixes, repeated_blocks

    family = from_transformer_config(config, "the memory plan's config")
    model = _skeleton(config, family)
    constants = family.activations
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    prefixes = quantized_prefixes(model)
    quantized = sum(m.weight.numel() for n, m in linears.items() if shape.nf4 and n.startswith(prefixes))
    total = sum(p.numel() for p in model.parameters())
    weights = quantized * NF4_BYTES + (total - quantized) * shape.compute_bytes

    lora_params = sum(shape.rank * (m.in_features + m.out_features) for n, m in linears.items()
                      if is_target(n, shape.targets))
    # fp32 master and gradient, AdamW's two moments (1 byte each in 8 bits, else 4), a compute copy and its gradient
    lora = lora_params * (4 + 4 + (2 if shape.eight_bit_adam else 8) + 2 * shape.compute_bytes)

    blocks = len(repeated_blocks(model))
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (shape.width // 16) * (shape.height // 16) + shape.text_tokens
    per_token = hidden * shape.compute_bytes / 2  # the calibration ran in 2-byte compute
    if not shape.gradient_checkpointing:
        kept = blocks * constants.block_bytes
    else:
        checkpointed = math.ceil(blocks / shape.checkpointing_interval)
        inputs = 2 if shape.offload_activations else checkpointed  # offloaded: the current and the prefetched
        kept = inputs * constants.ckpt_input_bytes + (blocks - checkpointed + 1) * constants.block_bytes
    activations = constants.workspace_gib * GIB + tokens * shape.batch_size * per_token * kept
    encoding = shape.width * shape.height * VAE_ENCODE_BYTES_PER_PIXEL * shape.compute_bytes / 2
    if shape.latents == "none":  # the VAE stays and encodes each batch, its activations freed before the forward
        activations = VAE_GIB * GIB + max(activations, encoding * shape.batch_size)
        caching = 0.0
    else:  # encoded once, one image at a time, before the transformer loads
        caching = VAE_GIB * GIB + encoding

    offloaded = 0
    if shape.gradient_checkpointing and shape.offload_activations:
        offloaded = (tokens * shape.batch_size * per_token * math.ceil(blocks / shape.checkpointing_interval)
                     * constants.ckpt_input_bytes)
    latent_bytes = config["in_channels"] // 4 * (shape.width // 8) * (shape.height // 8) * shape.compute_bytes
    pixel_bytes = 3 * shape.width * shape.height
    embedding_bytes = ((shape.text_tokens * config["joint_attention_dim"] + config.get("pooled_projection_dim", 0))
                       * shape.compute_bytes)
    image_bytes = {"memory": latent_bytes, "disk": 0, "none": pixel_bytes}[shape.latents]
    data = shape.num_images * (embedding_bytes + image_bytes)
    ram = PROCESS_RAM_GIB * GIB + data + offloaded
    return MemoryPlan(weights / GIB, lora / GIB, activations / GIB, ram / GIB, caching / GIB)


def plans_that_fit(config: dict, shape: TrainingShape, capacity_gib: float) -> list[str]:
    """The changes of flags (most effective first) whose plan fits in `capacity_gib`, for the refusal message."""
    from dataclasses import replace

    options = [
        ("--gradient_checkpointing", replace(shape, gradient_checkpointing=True, checkpointing_interval=1)),
        ("--train_batch_size 1", replace(shape, batch_size=1)),
        ("--offload_activations", replace(shape, gradient_checkpointing=True, offload_activations=True,
                                          checkpointing_interval=1)),
        ("--width 512 --height 512", replace(shape, width=512, height=512)),
    ]
    current = (shape.gradient_checkpointing, shape.checkpointing_interval, shape.batch_size,
               shape.offload_activations, shape.width, shape.height)
    fits = []
    for flags, option in options:
        changed = (option.gradient_checkpointing, option.checkpointing_interval, option.batch_size,
                   option.offload_activations, option.width, option.height) != current
        if changed and plan_training(config, option).peak_gib <= capacity_gib:
            fits.append(flags)
    return fits


def check_fits(config: dict, shape: TrainingShape, plan: MemoryPlan, device: Device) -> None:
    """Stops a run whose predicted peak exceeds the GPU, naming the flags whose plan would fit."""
    if not device.memory_gib or plan.peak_gib <= device.memory_gib:
        return
    fits = plans_that_fit(config, shape, device.memory_gib)
    raise UserError(f"this run needs ~{plan.peak_gib:.1f} GiB of GPU memory, {device.describe()} has "
                    f"{device.memory_gib:.1f} GiB: " + (f"add {' or '.join(fits)}." if fits else
                                                        "no smaller setting fits either; use a bigger GPU."))

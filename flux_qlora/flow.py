"""Flow-matching maths for FLUX.1 and FLUX.2 training, as diffusers' Flux trainers define it.

x_t = (1 - sigma) * x_0 + sigma * noise; the transformer predicts the velocity noise - x_0 from packed 2x2
latent patches; sigma is drawn from a density over 1000 discrete training timesteps and optionally shifted.
The trainer decides when a step runs; `draw_noise_and_sigmas` and `flow_matching_step` are what one step computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flux_qlora.batches import Batch
    from flux_qlora.families import Family

NUM_TRAIN_TIMESTEPS = 1000
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 latent patch becomes one token."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latents of (height, width)."""
    b, _, d = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, d // 4, height, width)


def sample_density(scheme: str, batch_size: int, generator: torch.Generator | None = None,
                   logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """u in [0, 1): where on the noise schedule each sample is trained (SD3 paper, section 3.1)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(batch_size, generator=generator) * logit_std + logit_mean)
    u = torch.rand(batch_size, generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sigmas_from_density(u: torch.Tensor) -> torch.Tensor:
    """Discretizes u onto the 1000 training timesteps (t = 1000 ... 1), as the diffusers trainers index them."""
    index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return (NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Moves training towards noisier timesteps: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (SD3's `compute_loss_weighting_for_sd3`)."""
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        return 2 / (math.pi * bot)
    return torch.ones_like(sigmas)


def flow_matching_loss(model_pred: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor,
                       sigmas: torch.Tensor, scheme: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE between the predicted and the true velocity (noise - latents), averaged per sample; with `mask`
    (B, 1, h, w) in [0, 1] on the latent grid, averaged over the masked-in latent pixels only."""
    target = noise.float() - latents.float()
    weights = loss_weighting(scheme, sigmas).view(-1, *[1] * (latents.dim() - 1))
    error = weights * (model_pred.float() - target) ** 2
    if mask is None:
        return error.reshape(latents.shape[0], -1).mean(1).mean()
    mask = mask.float().expand_as(error)
    covered = mask.reshape(latents.shape[0], -1).sum(1).clamp_min(1e-6)  # a sample masked out entirely counts 0
    return ((error * mask).reshape(latents.shape[0], -1).sum(1) / covered).mean()


@dataclass(frozen=True)
class TimestepSampling:
    """Where on the noise schedule samples are trained: the density (`WEIGHTING_SCHEMES`) and the sigma shift."""

    scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | None = 1.0  # None: the family's resolution-dependent shift
    resolution_shift: Callable[[int], float] | None = None  # the family's: image tokens -> shift (`Family`)


def draw_noise_and_sigmas(sampling: TimestepSampling, generator: torch.Generator, global_batch: int, part: slice,
                          latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, sigmas) for `part` of a global batch, both drawn for the whole batch from `generator`, so a process
    of a data-parallel run gets exactly the rows a single process would."""
    noise = torch.randn((global_batch, *latent_shape), generator=generator)[part]
    u = sample_density(sampling.scheme, global_batch, generator, sampling.logit_mean, sampling.logit_std,
                       sampling.mode_scale)[part]
    sigmas = sigmas_from_density(u)
    h, w = latent_shape[-2:]
    shift = sampling.resolution_shift(h * w // 4) if sampling.shift is None else sampling.shift
    return noise, shift_sigmas(sigmas, shift) if shift != 1.0 else sigmas


def flow_matching_step(transformer: torch.nn.Module, family: Family, batch: Batch, noise: torch.Tensor,
                       sigmas: torch.Tensor, text_ids: torch.Tensor, image_ids: torch.Tensor, guidance: float | None,
                       scheme: str) -> torch.Tensor:
    """One forward pass and its loss: noise the latents to sigma, predict the velocity (noise - latents) with the
    transformer of `family`. `guidance`: the guidance vector's value, None for a transformer without guidance
    embeddings."""
    latents = batch.latents
    sig = sigmas.view(-1, 1, 1, 1).to(latents.device)
    noise = noise.to(latents.device, latents.dtype)
    noisy = ((1 - sig) * latents.float() + sig * noise.float()).to(latents.dtype)
    guidance = None if guidance is None else torch.full((latents.shape[0],), guidance, device=latents.device)
    model_pred = family.forward(transformer, pack_latents(noisy), sig.flatten().to(latents.dtype), guidance,
                                batch.prompt_embeds, batch.pooled_prompt_embeds, text_ids, image_ids)
    model_pred = unpack_latents(model_pred, *latents.shape[-2:])
    return flow_matching_loss(model_pred, noise, latents, sig.flatten(), scheme, batch.mask)

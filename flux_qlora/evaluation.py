"""The held-out eval loss: the flow-matching loss of images the run doesn't train on, at fixed timesteps and with
fixed noise, so its curve moves only when the LoRA does (an over-fitting run shows it rising while the training
loss still falls)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flux_qlora import flow, seeds
from flux_qlora.batches import TrainData, get_batch
from flux_qlora.families import Family

EVAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # a grid over the noise schedule instead of random timesteps


@torch.no_grad()
def eval_loss(transformer, family: Family, data: TrainData, guidance: float | None, scheme: str,
              autocast: Callable, seed: int) -> float:
    """The mean loss over every held-out item and every sigma of `EVAL_SIGMAS`, the noise of item i drawn from its
    own stream (seed, "eval-noise", i): the same inputs at every evaluation, independent of every training step's.
    `data` holds the held-out items, latents cached; `autocast` makes the training's autocast context."""
    device = next(transformer.parameters()).device
    text_ids = data.text_ids.to(device)
    losses = []
    for index, bucket in enumerate(data.buckets):
        for position in range(len(bucket)):
            batch = get_batch(data, index, torch.tensor([position]), 0, None, device)
            image_ids = family.image_ids(*batch.latents.shape[-2:], device=device, dtype=batch.latents.dtype)
            noise = eval_noise(seed, bucket.first_item + position, batch.latents.shape).to(device)
            for sigma in EVAL_SIGMAS:
                with autocast():
                    loss = flow.flow_matching_step(transformer, family, batch, noise, torch.tensor([sigma]),
                                                   text_ids, image_ids, guidance, scheme)
                losses.append(loss.float())
    return float(torch.stack(losses).mean())  # one host sync per evaluation


def eval_noise(seed: int, item: int, shape: torch.Size) -> torch.Tensor:
    """Held-out item `item`'s noise: from a stream of its own, never any training step's."""
    return torch.randn(shape, generator=seeds.generator(seed, "eval-noise", item))

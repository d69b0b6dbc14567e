"""Every random stream of a run drawn through flux_qlora/seeds.py: independent of one another, and the same for the
same (seed, stream, indices) wherever it is drawn."""

from __future__ import annotations

import torch

from flux_qlora import seeds
from flux_qlora.batches import Augment, SampleOrder
from flux_qlora.evaluation import eval_noise
from flux_qlora.flow import TimestepSampling, draw_noise_and_sigmas

LATENTS = (16, 6, 8)  # the tiny model's latents at 64x48


def training_noise(order: SampleOrder, micro_step: int) -> torch.Tensor:
    noise, _ = draw_noise_and_sigmas(TimestepSampling(), order.generator(micro_step), order.global_batch,
                                     order.rank_slice(0), LATENTS)
    return noise[0]


def test_the_eval_noise_is_no_training_steps_noise():
    """The held-out eval loss must be independent of training: before seeds.py the noise of held-out item e was
    the training noise of micro step e - 1 (seed 0, batch 1)."""
    for seed in (0, 1):
        train, prior = (SampleOrder([6], 1, 1, 1, seed, stream=stream) for stream in ("train", "prior"))
        steps = [training_noise(order, m) for order in (train, prior) for m in range(300)]
        for item in range(6):
            held_out = eval_noise(seed, item, LATENTS)
            assert not any(torch.equal(held_out, noise) for noise in steps)


def test_streams_are_apart_and_repeatable():
    """The same (seed, stream, indices) gives the same draw; another stream, seed or index another one; the prior's
    sample order is not the training images' of another epoch (as seed + 1 made it)."""
    draw = lambda *key: torch.rand(4, generator=seeds.generator(*key))  # noqa: E731
    assert torch.equal(draw(0, "train/noise", 3), draw(0, "train/noise", 3))
    others = [draw(0, "train/noise", 4), draw(1, "train/noise", 3), draw(0, "prior/noise", 3), draw(0, "eval-noise", 3)]
    assert not any(torch.equal(draw(0, "train/noise", 3), other) for other in others)
    train, prior = SampleOrder([50], 1, 1, 1, 0), SampleOrder([50], 1, 1, 1, 0, stream="prior")
    orders = {epoch: [int(train.batch(epoch * 50 + i, 0)[1]) for i in range(50)] for epoch in range(4)}
    assert [int(prior.batch(i, 0)[1]) for i in range(50)] not in orders.values()
    crops = {stream: [Augment("random", True, 0, stream).draw(item, 0, 10, 10) for item in range(50)]
             for stream in ("train", "prior")}
    assert crops["train"] != crops["prior"]

"""The flow-matching pieces against diffusers' own definitions and hand-computed values."""

import math

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3

from flux_qlora import flow
from flux_qlora.families.flux1 import FLUX1


def test_pack_matches_diffusers_and_round_trips():
    latents = torch.randn(2, 4, 6, 8)
    packed = flow.pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert packed.shape == (2, 12, 16)
    torch.testing.assert_close(flow.unpack_latents(packed, 6, 8), latents)
    # diffusers unpacks from pixel sizes with the VAE factor: 6x8 latents = 48x64 pixels at factor 8.
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 48, 64, 8), latents)


def test_image_ids_match_diffusers():
    ids = FLUX1.image_ids(6, 8)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))
    assert ids[5].tolist() == [0.0, 1.0, 1.0]  # row 1, column 1 of a 3x4 token grid


def test_sigmas_are_the_discrete_training_timesteps():
    u = torch.tensor([0.0, 0.0004, 0.5, 0.9999])
    # index = floor(u * 1000), timestep = 1000 - index, sigma = timestep / 1000
    assert flow.sigmas_from_density(u).tolist() == pytest.approx([1.0, 1.0, 0.5, 0.001])


def test_shift_and_resolution_shift():
    assert flow.shift_sigmas(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)  # 1.5 / 2
    assert flow.shift_sigmas(torch.tensor([1.0]), 3.0).item() == pytest.approx(1.0)
    assert FLUX1.resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert FLUX1.resolution_shift(4096) == pytest.approx(math.exp(1.15))


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap", "logit_normal", "mode"])
def test_loss_weights_match_diffusers(scheme):
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(flow.loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_density_mode_and_logit_normal():
    g = torch.Generator().manual_seed(0)
    u = flow.sample_density("logit_normal", 10000, g, logit_mean=0.0, logit_std=1.0)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    u = flow.sample_density("mode", 4, torch.Generator().manual_seed(0), mode_scale=0.0)
    expected = 1 - torch.rand(4, generator=torch.Generator().manual_seed(0))  # scale 0 reduces to 1 - u
    torch.testing.assert_close(u, expected)


def test_loss_is_weighted_mse_to_velocity():
    latents, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    pred = torch.full((2, 1, 2, 2), 3.0)  # velocity target is 1: error 2, squared 4
    sigmas = torch.tensor([0.5, 0.5])
    assert flow.flow_matching_loss(pred, noise, latents, sigmas, "none").item() == pytest.approx(4.0)
    assert flow.flow_matching_loss(pred, noise, latents, sigmas, "sigma_sqrt").item() == pytest.approx(16.0)

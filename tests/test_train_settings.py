"""train_settings.resolve: the trainer's derived settings, resolved once from flags that stay as the user typed them."""

from __future__ import annotations

import copy

import pytest

import train_qlora_flux
from flux_qlora.families.flux1 import FLUX_DEV_CONFIG
from flux_qlora.memory import TrainingShape, plan_training

REQUIRED = ["--instance_data_dir", "images", "--data_df_path", "embeddings.parquet"]


def resolved(*flags: str):
    args = train_qlora_flux.parse_args([*REQUIRED, *flags])
    typed = copy.deepcopy(vars(args))
    settings = train_qlora_flux.validate_args(args)
    assert vars(args) == typed  # args is never rewritten: training_config.toml records what the user typed
    return settings


def test_one_size_or_buckets_as_data():
    plain = resolved()
    assert (plain.sizes.lists, plain.sizes.bucketed, plain.sizes.validation) == ((((512, 512),),), False, (512, 512))
    assert plain.sizes.describe() == "512x512" and plain.max_train_steps is None
    sized = resolved("--width", "512", "--height", "768", "--max_train_steps", "7")
    assert sized.sizes.largest == (512, 768) and sized.sizes.describe() == "512x768" and sized.max_train_steps == 7
    buckets = resolved("--resolution", "1024,512")
    assert buckets.sizes.bucketed and buckets.sizes.resolutions == (512, 1024)
    assert buckets.sizes.validation == (512, 512) and buckets.sizes.largest[0] * buckets.sizes.largest[1] >= 1024**2
    assert buckets.sizes.count == sum(len(sizes) for sizes in buckets.sizes.lists) > 2
    assert buckets.sizes.describe() == "buckets of ~512x512, ~1024x1024 pixels"


@pytest.mark.parametrize("flags, latents", [((), "none"), (("--cache_latents",), "memory"),
                                            (("--cache_latents_dir", "latents"), "disk"),
                                            (("--cache_latents", "--cache_latents_dir", "latents"), "disk")])
def test_the_latents_mode(flags, latents):
    assert resolved(*flags).latents == latents


def test_the_memory_plan_counts_latents_cached_on_disk_as_disk():
    ram = {mode: plan_training(FLUX_DEV_CONFIG, TrainingShape(1024, 1024, 512, num_images=10_000, latents=mode)).ram_gib
           for mode in ("none", "memory", "disk")}
    assert ram["disk"] < ram["memory"] < ram["none"]
    assert ram["memory"] - ram["disk"] == pytest.approx(10_000 * 16 * 128 * 128 * 2 / 2**30)  # bf16 latents

"""Aspect-ratio buckets: sizes, assignment, one bucket per batch, per-epoch crops and flips, exact resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import assert_one_line_error, assert_same_lora, run_script, train_args

from flux_qlora.batches import Augment, SampleOrder
from flux_qlora.buckets import check_size_flags, make_buckets, nearest_bucket, parse_resolutions
from flux_qlora.errors import UserError


@pytest.mark.parametrize("resolution, step", [(512, 64), (1024, 64), (768, 64), (64, 16)])
def test_buckets_have_the_area_the_sides_and_the_ratios_asked_for(resolution, step):
    buckets = make_buckets(resolution, step)
    assert (resolution, resolution) in buckets and len(buckets) >= 3
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert 1 / 2.5 <= width / height <= 2.5
        assert abs(width * height / resolution**2 - 1) < 0.2
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)  # tallest to widest, one per ratio


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    buckets = make_buckets(512)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    portrait, landscape = nearest_bucket(600, 900, buckets), nearest_bucket(1800, 1000, buckets)
    assert portrait[0] < portrait[1] and landscape[0] > landscape[1]
    assert math.isclose(portrait[0] / portrait[1], 2 / 3, rel_tol=0.1)
    assert nearest_bucket(5000, 100, buckets) == max(buckets, key=lambda b: b[0] / b[1])  # the widest there is


def test_size_flags_are_checked():
    assert parse_resolutions("1024,512,512", 64) == [512, 1024]
    assert check_size_flags("768,512", 64, None, None) == (512, 512)
    assert check_size_flags(None, 64, None, None) == (512, 512)
    for args, fragments in [(("100", 64, None, None), ["--resolution 100", "--bucket_step 64", "try 128"]),
                            (("512", 64, 512, None), ["--resolution", "--width", "not both"]),
                            (("512", 40, None, None), ["--bucket_step 40", "multiple of 16"]),
                            (("big", 64, None, None), ["--resolution big", "whole numbers"])]:
        with pytest.raises(UserError) as error:
            check_size_flags(*args)
        assert all(f in str(error.value) for f in fragments), str(error.value)


def test_every_batch_comes_from_one_bucket_and_each_item_comes_once_per_epoch():
    order = SampleOrder(bucket_sizes=[5, 3, 4], repeats=2, batch_size=2, num_processes=1, seed=3)
    assert order.micro_steps_per_epoch == 5 + 3 + 4  # 10 // 2 + 6 // 2 + 8 // 2
    seen = {b: [] for b in range(3)}
    for step in range(order.micro_steps_per_epoch):
        bucket, positions = order.batch(step, rank=0)
        assert len(positions) == 2 and bool((positions < [5, 3, 4][bucket]).all())
        seen[bucket] += positions.tolist()
    for bucket, n in enumerate([5, 3, 4]):
        assert sorted(seen[bucket]) == sorted(list(range(n)) * 2)
    buckets_in_order = [order.batch(step, 0)[0] for step in range(order.micro_steps_per_epoch)]
    assert buckets_in_order != sorted(buckets_in_order)  # the buckets' batches are shuffled together
    again = SampleOrder(bucket_sizes=[5, 3, 4], repeats=2, batch_size=2, num_processes=1, seed=3)
    assert all(torch.equal(again.batch(s, 0)[1], order.batch(s, 0)[1]) for s in range(30))  # a function of the seed


def test_random_crops_and_flips_are_functions_of_seed_item_and_epoch():
    augment = Augment("random", random_flip=True, seed=7)
    draws = {(item, epoch): augment.draw(item, epoch, 40, 40) for item in range(8) for epoch in range(4)}
    assert all(augment.draw(item, epoch, 40, 40) == d for (item, epoch), d in draws.items())  # repeatable
    assert len({d[:2] for d in draws.values()}) > 16  # crops move between items and epochs
    assert {d[2] for d in draws.values()} == {True, False}
    assert all(0 <= left <= 40 and 0 <= top <= 40 for left, top, _ in draws.values())
    assert Augment("center").draw(3, 5, 40, 20) == (20, 10, False)


@pytest.mark.slow
@pytest.mark.parametrize("cache_latents", [pytest.param(False, id="random-crops-each-epoch"),
                                           pytest.param(True, id="cached-latents-both-flips")])
def test_bucketed_run_resumes_exactly(cache_latents, tiny_model, mixed_aspect_data, tmp_path):
    images, embeddings = mixed_aspect_data
    flags = ["--max_train_steps", "8", "--checkpointing_steps", "4", "--learning_rate", "1e-3", "--crop", "random",
             "--random_flip", "--mixed_precision", "no"]  # 6 images: steps 7-8 are the second epoch
    size = ("--resolution", "64", "--bucket_step", "16")
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, images, embeddings, tmp_path / "full", *flags,
                                                           size=size, cache_latents=cache_latents))
    assert "6 images, 6 items in 3 bucket(s): 48x96: 2, 64x64: 1, 96x48: 3" in result.stderr
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", interrupted / "checkpoint-4")
    run_script("train_qlora_flux.py", *train_args(tiny_model, images, embeddings, interrupted, *flags,
                                                  "--resume_from_checkpoint", "latest", size=size,
                                                  cache_latents=cache_latents))
    assert_same_lora(tmp_path / "full", interrupted)
    losses = [json.loads((run / "train_summary.json").read_text())["losses"] for run in (tmp_path / "full",
                                                                                           interrupted)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 8


def test_an_image_too_small_for_its_bucket_is_refused(tiny_model, mixed_aspect_data, tmp_path):
    images, embeddings = mixed_aspect_data
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, images, embeddings, tmp_path / "out",
                                                           size=("--resolution", "512")), check=False)
    assert_one_line_error(result, "too small for its", "bucket", "smaller --resolution")


def test_caption_dropout_trains_those_samples_on_the_empty_caption():
    from flux_qlora.batches import Bucket, TrainData, get_batch

    order = SampleOrder(bucket_sizes=[4], repeats=1, batch_size=2, num_processes=2, seed=0)
    assert not any(order.dropped(s, r, 0.0).any() for s in range(10) for r in range(2))
    drawn = torch.stack([order.dropped(s, r, 0.3) for s in range(500) for r in range(2)])
    assert 0.25 < drawn.float().mean() < 0.35 and torch.equal(drawn[7], order.dropped(3, 1, 0.3))

    embeds, pooled = torch.randn(4, 5, 8), torch.randn(4, 6)
    bucket = Bucket((16, 16), torch.arange(4), 0, None, latents=torch.randn(4, 4, 2, 2))
    data = TrainData(keys=list("abcd"), prompt_embeds=embeds.clone(), pooled_prompt_embeds=pooled.clone(),
                     text_ids=torch.zeros(5, 3), buckets=[bucket],
                     empty_caption=(torch.zeros(1, 5, 8), torch.zeros(1, 6)))
    batch = get_batch(data, 0, torch.tensor([2, 0]), 0, None, torch.device("cpu"), torch.tensor([True, False]))
    assert batch.prompt_embeds[0].abs().sum() == 0 and batch.pooled_prompt_embeds[0].abs().sum() == 0
    assert torch.equal(batch.prompt_embeds[1], embeds[0]) and torch.equal(data.prompt_embeds, embeds)  # data kept


def test_caption_dropout_needs_the_empty_caption_row(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    import pyarrow.parquet as pq

    from flux_qlora.embeddings import prompt_key

    table = pq.read_table(tiny_embeddings)
    keep = [key != prompt_key("") for key in table["image_hash"].to_pylist()]
    pq.write_table(table.filter(keep), tmp_path / "old.parquet")  # as compute_embeddings.py wrote it before
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tmp_path / "old.parquet",
                                                           tmp_path / "out", "--caption_dropout", "0.2"), check=False)
    assert_one_line_error(result, "empty caption", "--caption_dropout", "re-run compute_embeddings.py")
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "ok",
                                                  "--caption_dropout", "0.5", "--max_train_steps", "2"))
    assert json.loads((tmp_path / "ok" / "train_summary.json").read_text())["steps"] == 2


@pytest.mark.slow
@pytest.mark.gpu  # bf16 and CUDA graphs there
def test_compiled_buckets_compile_once_per_size(tiny_model, mixed_aspect_data, tmp_path):
    """--compile with three buckets: each size compiles on its first step (one graph per block kind and sequence
    length), never again (no recompiles counted); on a GPU with --cuda_graphs, one graph is captured per bucket
    (18 steps: each bucket steps at least 3 times)."""
    images, embeddings = mixed_aspect_data
    gpu = torch.cuda.is_available()
    flags = ["--max_train_steps", "18", "--compile", "--mixed_precision", "bf16" if gpu else "no",
             *(["--cuda_graphs"] if gpu else [])]
    run_script("train_qlora_flux.py", *train_args(tiny_model, images, embeddings, tmp_path / "out", *flags,
                                                  size=("--resolution", "64", "--bucket_step", "16")))
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["training_sizes"] == 3
    # Each block kind compiles once per sequence length: the portrait and landscape buckets have the same token
    # count (the blocks see (batch, tokens, width)), so 3 sizes make 2 x 2 graphs.
    assert summary["graphs_compiled"] == 2 * 2 and summary["recompiles"] == 0
    assert summary["cuda_graphs_captured"] == (3 if gpu else 0)

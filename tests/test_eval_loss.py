"""The held-out eval loss: images kept out of training, fixed timesteps and noise, a curve that moves only with the
LoRA."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_script, train_args

from flux_qlora.batches import held_out_rows
from flux_qlora.data import load_local_samples


def test_held_out_images_are_a_fixed_share_chosen_by_hash(tiny_images_master):
    samples = load_local_samples(str(tiny_images_master), "text", None)
    rows = held_out_rows(samples, 0.34)
    assert len(rows) == 2 and rows == sorted(rows)
    lowest = sorted(samples, key=lambda s: s.image_hash)[:2]
    assert {samples[r].image_hash for r in rows} == {s.image_hash for s in lowest}
    assert len(held_out_rows(samples, 0.01)) == 1 and len(held_out_rows(samples, 0.99)) == 5  # one kept, one trained
    assert held_out_rows(samples, 0.0) == []


@pytest.mark.parametrize("learning_rate, moves", [pytest.param("0", False, id="frozen-lora-flat-curve"),
                                                  pytest.param("1e-2", True, id="training-moves-it")])
def test_eval_loss_is_deterministic_and_moves_only_with_the_lora(learning_rate, moves, tiny_model,
                                                                 tiny_images_master, tiny_embeddings, tmp_path):
    result = run_script("train_qlora_flux.py", *train_args(
        tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out", "--max_train_steps", "4",
        "--validation_split", "0.34", "--eval_steps", "2", "--learning_rate", learning_rate, "--mixed_precision",
        "no", "--lora_layers", "all-linear", "--init_lora_weights", "default"))
    assert "2 image(s) held out for the eval loss" in result.stderr and "6 images, 4 items" in result.stderr
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    steps, losses = zip(*summary["eval_losses"])
    assert steps == (0, 2, 4) and all(0 < loss < 10 for loss in losses)
    if moves:
        assert len(set(losses)) == 3
    else:  # the same inputs at every evaluation: the same loss, to the last bit
        assert losses[0] == losses[1] == losses[2]
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000


def test_validation_split_is_checked(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                           tmp_path / "out", "--validation_split", "1"), check=False)
    assert_one_line_error(result, "--validation_split 1", "below 1")

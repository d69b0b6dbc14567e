"""The held-out eval loss: images kept out of training, fixed timesteps and noise, a curve that moves only with the
LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line_error, assert_refused, built_once, run_script, train_args
from PIL import Image

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
    # one image: a split holds out none (the image must train)
    assert_refused(lambda: held_out_rows(samples[:1], 0.5), "--validation_split 0.5 of 1 image(s) holds out none",
                   "2 images or more", "--eval_data_dir")


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


@pytest.fixture(scope="module")
def eval_folder(tiny_model, tiny_images_master, tmp_path_factory):
    """(held-out folder, embeddings of the training and held-out images): two tiny images upside down, captioned;
    made once for every worker."""
    def build(root: Path) -> Path:
        folder = root / "held_out"
        folder.mkdir()
        for png in sorted(tiny_images_master.glob("*.png"))[:2]:
            Image.open(png).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(folder / png.name)
            (folder / png.with_suffix(".txt").name).write_text("an upside-down shape")
        result = run_script("compute_embeddings.py", "--pretrained_model_name_or_path", tiny_model,
                            "--instance_data_dir", tiny_images_master, "--eval_data_dir", folder, "--output_path",
                            root / "embeddings.parquet", "--max_sequence_length", "16", "--device", "cpu")
        assert "(with 2 eval images from" in result.stderr
        return root

    root = built_once(tmp_path_factory, "eval", build)
    return root / "held_out", root / "embeddings.parquet"


def test_eval_data_dir_is_held_out_and_every_training_image_trains(tiny_model, tiny_images_master, eval_folder,
                                                                   tmp_path):
    folder, embeddings = eval_folder
    result = run_script("train_qlora_flux.py", *train_args(
        tiny_model, tiny_images_master, embeddings, tmp_path / "out", "--max_train_steps", "2", "--eval_data_dir",
        folder, "--eval_steps", "1", "--learning_rate", "0", "--mixed_precision", "no"))
    assert "2 image(s) held out for the eval loss" in result.stderr and "6 images, 6 items" in result.stderr
    steps, losses = zip(*json.loads((tmp_path / "out" / "train_summary.json").read_text())["eval_losses"])
    assert steps == (0, 1, 2) and losses[0] == losses[1] == losses[2] and 0 < losses[0] < 10


def test_eval_data_dir_mistakes_are_refused(tiny_model, tiny_images_master, tiny_embeddings, eval_folder, tmp_path):
    folder, embeddings = eval_folder
    overlapping = tmp_path / "overlapping"
    shutil.copytree(folder, overlapping)
    shutil.copy(next(tiny_images_master.glob("*.png")), overlapping)
    # (--validation_split with --eval_data_dir, a flag-only mistake: test_train.py's in-process table)
    cases = [(tiny_embeddings, folder, ["no embeddings", "--eval_data_dir"]),
             (embeddings, overlapping, ["also training images", "--eval_data_dir"])]
    for parquet, held_out, fragments in cases:
        result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, parquet,
                                                               tmp_path / "out", "--eval_data_dir", held_out),
                            check=False)
        assert_one_line_error(result, *fragments)

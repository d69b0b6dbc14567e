"""Regularisation (prior-preservation) images: embedded with the training set, a batch of them in every step,
their loss weighted by --prior_loss_weight as diffusers' DreamBooth trainers define it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    CPU_ONLY,
    GOLDEN_FLAGS,
    GOLDEN_LOSSES,
    assert_one_line_error,
    built_once,
    run_script,
    train_args,
)
from PIL import Image

from flux_qlora.embeddings import read_embeddings


@pytest.fixture(scope="module")
def prior_data(tiny_model, tiny_images_master, tmp_path_factory):
    """(class images, embeddings of the training and the class images): three mirrored tiny images, uncaptioned;
    made once for every worker."""
    def build(root: Path) -> Path:
        folder = root / "class"
        folder.mkdir()
        for png in sorted(tiny_images_master.glob("*.png"))[:3]:
            Image.open(png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / png.name)
        run_script("compute_embeddings.py", "--pretrained_model_name_or_path", tiny_model, "--instance_data_dir",
                   tiny_images_master, "--class_data_dir", folder, "--class_prompt", "a shape", "--output_path",
                   root / "embeddings.parquet", "--max_sequence_length", "16", "--device", "cpu")
        return root

    root = built_once(tmp_path_factory, "prior", build)
    return root / "class", root / "embeddings.parquet"


def test_compute_embeddings_embeds_the_class_images_too(prior_data):
    _, embeddings = prior_data
    table = read_embeddings(embeddings)
    assert len(table.keys) == 6 + 3 + 1  # training images, class images, the empty caption
    assert table.captions.count("a shape") == 3


@pytest.mark.parametrize("weight", ["0", "1"])
def test_prior_loss_is_added_with_its_weight(weight, tiny_model, tiny_images_master, prior_data, tmp_path):
    folder, embeddings = prior_data
    result = run_script("train_qlora_flux.py", *train_args(
        tiny_model, tiny_images_master, embeddings, tmp_path / "out", *GOLDEN_FLAGS, "--class_data_dir", folder,
        "--class_prompt", "a shape", "--prior_loss_weight", weight), env=CPU_ONLY)
    assert "3 regularisation images" in result.stderr
    losses = torch.tensor(json.loads((tmp_path / "out" / "train_summary.json").read_text())["losses"])
    if weight == "0":  # the regularisation batch then changes nothing: the plain run, exactly
        torch.testing.assert_close(losses, torch.tensor(GOLDEN_LOSSES), rtol=1e-4, atol=0)
    else:  # loss = instance loss + prior loss
        assert (losses - torch.tensor(GOLDEN_LOSSES)).abs().min() > 0.05


def test_class_images_without_embeddings_are_refused(tiny_model, tiny_images_master, tiny_embeddings, prior_data,
                                                     tmp_path):
    folder, _ = prior_data
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                           tmp_path / "out", "--class_data_dir", folder,
                                                           "--class_prompt", "a shape"), check=False)
    assert_one_line_error(result, "no embeddings", "--class_data_dir")

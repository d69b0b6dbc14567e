"""Masked loss: a mask per image (NAME_mask.png or the alpha channel) weights the loss on the latent grid."""

from __future__ import annotations

import json
import logging
import shutil

import torch
from helpers import assert_one_line_error, assert_refused, run_script, train_args
from PIL import Image

from flux_qlora import flow
from flux_qlora.batches import Augment, load_buckets, on_latent_grid
from flux_qlora.data import load_local_samples


def test_masked_out_latent_pixels_get_no_gradient():
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    pred = torch.randn(2, 4, 6, 8, requires_grad=True)
    mask = torch.ones(2, 1, 6, 8)
    mask[:, :, :, 4:] = 0  # the right half doesn't count
    loss = flow.flow_matching_loss(pred, noise, latents, torch.tensor([0.3, 0.8]), "none", mask)
    loss.backward()
    assert pred.grad[..., 4:].abs().max() == 0 and pred.grad[..., :4].abs().min() > 0
    # the masked loss is the mean over the masked-in half; a mask of ones is the plain loss
    half = flow.flow_matching_loss(pred[..., :4], noise[..., :4], latents[..., :4], torch.tensor([0.3, 0.8]), "none")
    torch.testing.assert_close(loss, half)
    plain = flow.flow_matching_loss(pred, noise, latents, torch.tensor([0.3, 0.8]), "none")
    torch.testing.assert_close(flow.flow_matching_loss(pred, noise, latents, torch.tensor([0.3, 0.8]), "none",
                                                       torch.ones(2, 1, 6, 8)), plain)


def _masked_images(source, folder, alpha: bool = False):
    """The tiny images, each with a mask (or alpha) that keeps its left half only."""
    folder.mkdir()
    for png in sorted(source.glob("*.png")):
        image = Image.open(png).convert("RGB")
        mask = Image.new("L", image.size, 0)
        mask.paste(255, (0, 0, image.width // 2, image.height))
        if alpha:
            image.putalpha(mask)
        else:
            mask.save(folder / f"{png.stem}_mask.png")
        image.save(folder / png.name)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


def test_masks_follow_their_image_through_crops_and_flips(tiny_images_master, tmp_path):
    folder = _masked_images(tiny_images_master, tmp_path / "masked")
    samples = load_local_samples(str(folder), "text", None)
    assert len(samples) == 6 and all(s.open_mask is not None for s in samples)  # masks are not images
    (bucket,) = load_buckets(samples, [[(48, 48)]], check_size=False)
    augment = Augment("random", random_flip=True, seed=1)
    for epoch in range(4):
        pixels, masks = bucket.crops(torch.arange(len(bucket)), epoch, augment)
        assert masks.shape == (6, 1, 48, 48)
        for item in range(6):  # the mask's kept half is the image's left half, wherever the crop and flip put it
            cover = bucket.covers[item]
            left_half = cover[:, :, : cover.shape[2] // 2].float().mean()
            kept = pixels[item][:, masks[item, 0] == 255].float().mean()
            assert abs(kept - left_half) < 25
    assert on_latent_grid(masks, torch.zeros(6, 4, 6, 6)).shape == (6, 1, 6, 6)


def test_alpha_masks_and_mask_files_train(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    for name, alpha in [("files", False), ("alpha", True)]:
        folder = _masked_images(tiny_images_master, tmp_path / name, alpha=alpha)
        embeddings = tiny_embeddings
        if alpha:  # the RGBA pixels hash differently: their own embeddings
            embeddings = tmp_path / "alpha.parquet"
            run_script("compute_embeddings.py", "--pretrained_model_name_or_path", tiny_model, "--instance_data_dir",
                       folder, "--output_path", embeddings, "--max_sequence_length", "16", "--device", "cpu")
        run_script("train_qlora_flux.py", *train_args(tiny_model, folder, embeddings, tmp_path / f"out-{name}",
                                                      "--max_train_steps", "2", *(["--alpha_mask"] if alpha else [])))
        summary = json.loads((tmp_path / f"out-{name}" / "train_summary.json").read_text())
        assert len(summary["losses"]) == 2 and all(0 < loss < 10 for loss in summary["losses"])


def test_a_mask_of_another_size_is_refused(tiny_model, tiny_images, tiny_embeddings, tmp_path):
    Image.new("L", (10, 10), 255).save(tiny_images / "000_mask.png")
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images, tiny_embeddings, tmp_path / "o"),
                        check=False)
    assert_one_line_error(result, "mask of", "000.png", "10x10", "make the mask the size of its image")


def _black_masks(samples_folder, how_many: int) -> None:
    """The first `how_many` images (by name) get an all-black NAME_mask.png, the others none."""
    for png in sorted(p for p in samples_folder.glob("*.png") if not p.stem.endswith("_mask"))[:how_many]:
        Image.new("L", Image.open(png).size, 0).save(png.with_name(f"{png.stem}_mask.png"))


def test_all_black_masks_are_refused_and_some_are_one_warning_with_the_count(tiny_images, caplog):
    _black_masks(tiny_images, 2)
    with caplog.at_level(logging.WARNING):
        load_buckets(load_local_samples(str(tiny_images), "text", None), [[(48, 48)]], check_size=False,
                     what="training images")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 6 training images have an all-black loss mask" in warnings[0], warnings
    _black_masks(tiny_images, 6)
    samples = load_local_samples(str(tiny_images), "text", None)
    assert_refused(lambda: load_buckets(samples, [[(48, 48)]], check_size=False, what="training images"),
                   "all 6 training images have an all-black loss mask", "nothing would train", "white is where")
    # the held-out image's mask alone: that set is refused under its own name
    assert_refused(lambda: load_buckets(samples, [[(48, 48)]], check_size=False, rows=[0], what="held-out images"),
                   "all 1 held-out images")


def test_alpha_mask_without_alpha_is_refused_and_a_transparent_set_trains_nothing(tiny_images_master, tmp_path):
    plain = load_local_samples(str(tiny_images_master), "text", None)  # RGB: no alpha channel
    assert_refused(lambda: load_buckets(plain, [[(48, 48)]], check_size=False, alpha_mask=True,
                                        what="training images", alpha_required=True),
                   "--alpha_mask: none of the 6 training images has an alpha channel", "drop --alpha_mask")
    load_buckets(plain, [[(48, 48)]], check_size=False, alpha_mask=True)  # other sets (regularisation) may lack it
    folder = _masked_images(tiny_images_master, tmp_path / "alpha", alpha=True)
    samples = load_local_samples(str(folder), "text", None)
    load_buckets(samples, [[(48, 48)]], check_size=False, alpha_mask=True, alpha_required=True)
    for png in folder.glob("*.png"):  # fully transparent
        image = Image.open(png)
        image.putalpha(0)
        image.save(png)
    samples = load_local_samples(str(folder), "text", None)
    assert_refused(lambda: load_buckets(samples, [[(48, 48)]], check_size=False, alpha_mask=True,
                                        alpha_required=True), "all-black loss mask", "opaque")


def test_the_trainer_refuses_alpha_mask_on_images_without_alpha(tiny_model, tiny_images_master, tiny_embeddings,
                                                                tmp_path):
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                           tmp_path / "out", "--alpha_mask"), check=False)
    assert_one_line_error(result, "--alpha_mask: none of the 6 training images has an alpha channel")

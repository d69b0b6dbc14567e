"""Offline fixtures: a tiny Flux-shaped pipeline and captioned images, built once per test session; the collection
order and the end of the session. What the tests share besides fixtures is in helpers.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import RESUMED_FLAGS, VALIDATION, WarmPython, built_once, run_script, train_args

from flux_qlora.tiny import build_tiny_images, build_tiny_pipeline

os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (a stable sort: otherwise in file order). pytest-xdist hands out tests in this order,
    so the two workers start with the long end-to-end runs and finish together on short ones."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "models", lambda folder: build_tiny_pipeline(folder / "tiny-flux"))


@pytest.fixture(scope="session")
def tiny_images_master(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "data", lambda folder: build_tiny_images(folder / "images", count=6))


@pytest.fixture
def tiny_images(tiny_images_master, tmp_path) -> Path:
    """A fresh copy per test, so a test may edit captions or add files."""
    return Path(shutil.copytree(tiny_images_master, tmp_path / "images"))


@pytest.fixture(scope="session")
def tiny_embeddings(tiny_model, tiny_images_master, tmp_path_factory) -> Path:
    def build(folder: Path) -> Path:
        output = folder / "embeddings.parquet"
        run_script("compute_embeddings.py", "--pretrained_model_name_or_path", tiny_model,
                   "--instance_data_dir", tiny_images_master, "--output_path", output,
                   "--validation_prompt", VALIDATION, "--max_sequence_length", "16",
                   "--device", "cpu")  # the same fp32 embeddings on every machine: the training tests' inputs
        return output

    return built_once(tmp_path_factory, "embeddings", build)


@pytest.fixture(scope="session")
def mixed_aspect_data(tiny_model, tiny_images_master, tmp_path_factory) -> tuple[Path, Path]:
    """(images, embeddings): the tiny images as landscapes, portraits and squares, for the aspect-ratio buckets."""
    from PIL import Image

    def build(folder: Path) -> Path:
        images = folder / "images"
        images.mkdir()
        sizes = [(128, 64), (120, 60), (64, 128), (60, 120), (96, 96), (132, 66)]
        for (width, height), png in zip(sizes, sorted(tiny_images_master.glob("*.png"))):
            Image.open(png).convert("RGB").resize((width, height)).save(images / png.name)
            shutil.copy(png.with_suffix(".txt"), images)
        run_script("compute_embeddings.py", "--pretrained_model_name_or_path", tiny_model, "--instance_data_dir",
                   images, "--output_path", folder / "embeddings.parquet", "--max_sequence_length", "16",
                   "--device", "cpu")
        return folder

    folder = built_once(tmp_path_factory, "mixed", build)
    return folder / "images", folder / "embeddings.parquet"


@pytest.fixture(scope="session")
def resumed_run(tiny_model, tiny_images_master, tiny_embeddings, tmp_path_factory) -> Path:
    """A folder holding full/, a 6-step run with RESUMED_FLAGS, and interrupted/: what a run killed after its step-3
    checkpoint leaves on disk (checkpoints are renamed into place when complete), plus a half-written later one that
    must be ignored, resumed with `--resume_from_checkpoint latest` (its log: resumed.log). For the LoRA's resume
    (test_train.py) and the EMA's (test_ema.py)."""
    def build(folder: Path) -> Path:
        run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, folder / "full",
                                                      *RESUMED_FLAGS))
        interrupted = folder / "interrupted"
        interrupted.mkdir()
        shutil.copytree(folder / "full" / "checkpoint-3", interrupted / "checkpoint-3")
        (interrupted / ".checkpoint-5.tmp").mkdir()
        result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                               interrupted, *RESUMED_FLAGS,
                                                               "--resume_from_checkpoint", "latest"))
        (folder / "resumed.log").write_text(result.stderr)
        return folder

    return built_once(tmp_path_factory, "resumed", build)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """This process's warm Python (helpers.WarmPython) ends, and its temporary folder goes."""
    WarmPython.stop()

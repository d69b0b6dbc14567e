"""Latents cached on disk: reused by later runs, recomputed only for what changed, never stale, resumable."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CPU_ONLY, GOLDEN_FLAGS, GOLDEN_LOSSES, run_script, train_args
from PIL import Image


def train(tiny_model, images, embeddings, output, cache, *extra):
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, images, embeddings, output, *GOLDEN_FLAGS,
                                                           "--cache_latents_dir", cache, *extra), env=CPU_ONLY)
    losses = json.loads((output / "train_summary.json").read_text())["losses"]
    return result.stderr, losses


@pytest.mark.slow
def test_disk_cache_trains_like_memory_and_reuses_only_what_is_unchanged(tiny_model, tiny_images, tiny_embeddings,
                                                                         tmp_path):
    cache = tmp_path / "latents"
    log, losses = train(tiny_model, tiny_images, tiny_embeddings, tmp_path / "first", cache)
    assert "6 encoded, 0 reused" in log
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN_LOSSES), rtol=1e-4, atol=0)  # = in memory
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 6 and (cache / "manifest.json").exists()

    log, again = train(tiny_model, tiny_images, tiny_embeddings, tmp_path / "second", cache)
    assert "0 encoded, 6 reused" in log and again == losses

    # An interrupted encoding: one file never written (and a temporary left behind) is encoded, nothing else.
    files[0].unlink()
    files[1].with_name(f".{files[1].name}.123.tmp").write_bytes(b"half")
    log, resumed = train(tiny_model, tiny_images, tiny_embeddings, tmp_path / "third", cache)
    assert "1 encoded, 5 reused" in log and resumed == losses

    # A mask added to one image turns the masked loss on: every item's inputs change (the others now count whole),
    # new files, never the stale ones; editing that mask later re-encodes that item alone. (The latents are encoded
    # before the first step: one step is enough from here on.)
    image = Image.open(tiny_images / "003.png")
    Image.new("L", image.size, 255).save(tiny_images / "003_mask.png")
    log, _ = train(tiny_model, tiny_images, tiny_embeddings, tmp_path / "fourth", cache, "--max_train_steps", "1")
    assert "6 encoded, 0 reused" in log and len(list(cache.rglob("*.safetensors"))) == 12
    Image.new("L", image.size, 128).save(tiny_images / "003_mask.png")
    log, _ = train(tiny_model, tiny_images, tiny_embeddings, tmp_path / "fifth", cache, "--max_train_steps", "1")
    assert "1 encoded, 5 reused" in log

    # Another training size: all new.
    log, _ = train(tiny_model, tiny_images, tiny_embeddings, tmp_path / "sixth", cache, "--width", "48",
                   "--max_train_steps", "1")
    assert "6 encoded, 0 reused" in log

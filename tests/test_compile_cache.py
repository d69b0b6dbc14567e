"""flux_qlora/compile_cache.py in process, on a small compiled function (the trainer's use: tests/test_train.py)."""

from __future__ import annotations

import logging
import os

import torch

from flux_qlora.compile_cache import KEEP_FILES, SUFFIX, load_compile_cache, save_compile_cache


def test_one_file_per_set_of_graphs_the_newest_kept_and_failures_are_warnings(tmp_path, caplog):
    layer = torch.compile(torch.nn.Linear(8, 4))
    layer(torch.randn(2, 8)).sum().backward()
    folder = tmp_path / "cache"
    folder.mkdir()
    for i in range(KEEP_FILES):  # older files of other graphs
        old = folder / f"old{i}{SUFFIX}"
        old.write_bytes(b"x")
        os.utime(old, (1_000_000 + i, 1_000_000 + i))

    first = save_compile_cache(str(folder))
    assert first is not None and first.exists() and save_compile_cache(str(folder)) == first  # same graphs, same file
    kept = sorted(p.name for p in folder.glob(f"*{SUFFIX}"))
    assert len(kept) == KEEP_FILES and first.name in kept and "old0" + SUFFIX not in kept  # the oldest went
    assert not list(folder.glob(".*.tmp"))

    with caplog.at_level(logging.WARNING):
        assert load_compile_cache(str(folder)) == 1  # the real file; the others are damaged: skipped, one line each
        assert save_compile_cache("/proc/flux-qlora-compile-cache") is None  # unwritable: a warning, no exception
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("Skipping compile cache file" in w for w in warnings) == KEEP_FILES - 1
    assert any("Could not save the compiled graphs" in w for w in warnings)

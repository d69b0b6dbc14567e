"""torch.compile's caches kept in a folder of the user's (`--compile_cache_dir`), so a fresh machine starts warm.

Inductor and AOTAutograd already cache compiled graphs under /tmp, which helps a second run on the same machine;
a Colab VM or a rented GPU starts with an empty /tmp and compiles Flux's blocks again. Here the artifacts a run
compiled or used (`torch.compiler.save_cache_artifacts`) go to a file in the folder (e.g. on Google Drive), and
every file there is loaded into the local caches before anything compiles. A file holding other graphs (another
resolution, other flags) costs a lookup and nothing else: the caches key every graph by its content, torch
version and device, so a stale file can never give a wrong kernel.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from flux_qlora.files import written_atomically

logger = logging.getLogger(__name__)

KEEP_FILES = 8  # one per set of graphs (resolution, flags); the least recently written go first
SUFFIX = ".torchcompile"


def start_compile_workers(device: torch.device) -> None:
    """Starts inductor's pool of compile processes now, in the background, rather than at the first compile.

    Inductor starts the pool when dynamo hands it the first graph, and each worker imports torch before it compiles
    a kernel; started at launch, the workers get ready while the data and the model load. On the CPU inductor
    builds C++ kernels without the pool, so nothing is started there."""
    if device.type == "cuda":
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()


def load_compile_cache(folder: str | None) -> int:
    """Loads every cache file of `folder` into torch's local caches; call before anything compiles. Returns the
    number of files loaded. A damaged file is skipped with a warning: compiling again is always correct."""
    if not folder or not Path(folder).is_dir():
        return 0
    loaded = 0
    torch_log = logging.getLogger("torch.compiler._cache")  # it logs a damaged file's traceback, then returns None
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        for path in sorted(Path(folder).glob(f"*{SUFFIX}")):
            try:
                info = torch.compiler.load_cache_artifacts(path.read_bytes())
            except Exception as error:  # noqa: BLE001 - any damage means: compile as if the file weren't there
                info = error
            if info is None or isinstance(info, Exception):
                logger.warning("Skipping compile cache file %s (damaged or from another torch): its graphs compile "
                               "again.", path)
            else:
                loaded += 1
    finally:
        torch_log.setLevel(level)
    if loaded:
        logger.info("Loaded %d compile cache file(s) from %s", loaded, folder)
    return loaded


def save_compile_cache(folder: str | None) -> Path | None:
    """Writes the artifacts this process compiled or used to `folder` (atomically), named by their keys: the same
    graphs give the same file, so repeated runs don't grow the folder. Keeps the `KEEP_FILES` newest files. A
    failure is one warning: the run's own results never depend on it."""
    if not folder:
        return None
    try:
        return _write_artifacts(Path(folder))
    except Exception as error:  # noqa: BLE001 - a full disk or an unwritable folder must not fail the run
        logger.warning("Could not save the compiled graphs to --compile_cache_dir %s (%s): the next run compiles "
                       "them again.", folder, str(error).splitlines()[0][:160] if str(error) else type(error).__name__)
        return None


def _write_artifacts(folder: Path) -> Path | None:
    saved = torch.compiler.save_cache_artifacts()
    if not saved or not any(saved[1].artifacts.values()):
        return None
    data, info = saved
    keys = sorted(f"{kind}:{key}" for kind, keys in info.artifacts.items() for key in keys)
    path = folder / (hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] + SUFFIX)
    if path.exists():  # these graphs are there already (the end of a run, a repeated run): only newest again
        os.utime(path)
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with written_atomically(path) as partial:
        partial.write_bytes(data)
    for old in sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)[:-KEEP_FILES]:
        old.unlink(missing_ok=True)
    logger.info("Saved the compiled graphs to %s (%.1f MB): the next run with --compile_cache_dir %s starts warm",
                path, len(data) / 1e6, folder)
    return path


def compile_cache_bypasses() -> int:
    """Graphs inductor's FX graph cache refused to hold, so no --compile_cache_dir can keep them. torch 2.11 on CUDA
    refuses every checkpointed block's (the recomputed attention's RNG-state operator, marked cacheable in 2.13:
    pytorch#185562); reasons: TORCH_LOGS=inductor."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_bypass"]


def compile_cache_hits() -> int:
    """Graphs this process took from a cache (inductor's FX graph cache and AOTAutograd's) instead of compiling."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]

"""Files and paths: writing a file so that an interruption (Ctrl-C, kill -9, a full disk) never leaves half of it under
its name, and telling a path from a Hub id."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed onto `path` (atomic on one file system) when
    the block ends, removed when it fails. The name holds the process id: several processes may write one file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def looks_like_hub_id(name: str) -> bool:
    """owner/name, not a path: what the Hub accepts as a repository id."""
    return not name.startswith((".", "/")) and name.count("/") == 1

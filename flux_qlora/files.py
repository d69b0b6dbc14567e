"""Files and paths: writing a file so that an interruption (Ctrl-C, kill -9, a full disk) never leaves half of it under
its name, and telling a path from a Hub id."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from flux_qlora.errors import UserError

# What to do about a file-system error, by its errno: the class of mistake, wherever it surfaces.
HINTS = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
         errno.EACCES: "check its permissions or write elsewhere", errno.EROFS: "write elsewhere",
         errno.EPERM: "check its permissions or write elsewhere", errno.ENOENT: "check the path",
         errno.ENOTDIR: "a file stands where a folder is needed: give a folder path",
         errno.EEXIST: "a file stands where a folder is needed: give a folder path",
         errno.EISDIR: "a folder stands where a file is needed: give a file path"}


def write_failure(error: BaseException) -> tuple[str, int | None] | None:
    """(reason, errno) when `error` is a failed write, whatever type the library raised: an OSError (pyarrow's
    too), safetensors' SafetensorError (no OSError: its message carries Rust's "(os error N)"), torch.save's
    RuntimeError; None for anything else (a bug: its traceback stays)."""
    if isinstance(error, OSError):
        return error.strerror or str(error).splitlines()[0], error.errno
    text = str(error)
    found = re.search(r"os error (\d+)", text)
    library_io = (type(error).__name__ == "SafetensorError" or
                  (isinstance(error, RuntimeError) and re.search(r"open file failed|Parent directory|"
                                                                 r"PytorchStreamWriter|file write failed", text)))
    if not (library_io or found):
        return None
    number = int(found.group(1)) if found else None
    reason = os.strerror(number) if number else text.splitlines()[0][:160]
    return reason, number


@contextmanager
def writes_named(path: Path, what: str = "", kept: str = "") -> Iterator[None]:
    """Any failed write in the block (read-only folder, full disk, a folder in the way; any library's exception
    type) becomes one `UserError` naming `path`, the reason and what to do, plus `kept` (what is left intact)."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        failure = write_failure(error)
        if failure is None:
            raise
        reason, number = failure
        raise UserError(f"could not write {what + ' ' if what else ''}{path} ({reason}): "
                        f"{HINTS.get(number, 'check the path, its permissions and the free space')}"
                        f"{'; ' + kept if kept else ''}.") from None


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed onto `path` (atomic on one file system) when
    the block ends, removed when it fails, which leaves an earlier file at `path` as it was; a failed write is one
    line (`writes_named`). The name holds the process id: several processes may write one file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writes_named(path, kept="an earlier file of that name is left as it was"):
            yield partial
            os.replace(partial, path)
    finally:
        with suppress(OSError):
            partial.unlink(missing_ok=True)


def looks_like_hub_id(name: str) -> bool:
    """owner/name, not a path: what the Hub accepts as a repository id."""
    return not name.startswith((".", "/")) and name.count("/") == 1

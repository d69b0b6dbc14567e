"""Reading the files users give: one reader per kind of file (text, JSON, JSON lines, TOML, safetensors, images),
each turning every way the file can be wrong (missing, a folder, empty, truncated, not UTF-8, the wrong JSON shape,
non-finite tensors) into one `UserError` that names the file and says what to do. Every script reads user files
through these, so a new way of being wrong is handled once, for every file of its kind.

The embeddings parquet's reader is `embeddings.read_embeddings` (that module owns its columns), built on
`existing_file` and `check_finite` from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from flux_qlora.errors import UserError


def _reason(error: BaseException) -> str:
    """The first line of a library's message, short."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
    return text[:160]


def existing_file(path: str | Path, what: str, fix: str, allow_empty: bool = False) -> Path:
    """`path` as a readable regular file, else one line: `what` names it for the user (e.g. "--prompt_file"),
    `fix` says what to do."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file: {fix}.")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: {fix}.")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UserError(f"{what} {path} can't be read ({error.strerror or error}): {fix}.") from None
    if size == 0 and not allow_empty:
        raise UserError(f"{what} {path} is empty: {fix}.")
    return path


def read_text(path: str | Path, what: str, fix: str, allow_empty: bool = False) -> str:
    """A text file's content as UTF-8 (a leading byte-order mark dropped)."""
    path = existing_file(path, what, fix, allow_empty)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"{what} {path} can't be read ({error.strerror or error}): {fix}.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        fix = fix if "UTF-8" in fix else f"save it as UTF-8, or {fix}"
        raise UserError(f"{what} {path} is not UTF-8 text (byte {error.start}: {data[error.start:error.start + 4]!r}): "
                        f"{fix}.") from None


def read_json(path: str | Path, what: str, fix: str, shape: type = dict) -> dict | list:
    """A JSON file whose top level is a `shape` (an object by default)."""
    text = read_text(path, what, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{what} {path} is not valid JSON (line {error.lineno}: {error.msg}): {fix}.") from None
    if not isinstance(value, shape):
        raise UserError(f"{what} {path} holds a JSON {type(value).__name__}, not a JSON "
                        f"{'object' if shape is dict else shape.__name__}: {fix}.")
    return value


def read_jsonl(path: str | Path, what: str, keys: tuple[str, ...], fix: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file; each line an object holding `keys`."""
    for number, line in enumerate(read_text(path, what, fix, allow_empty=True).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{what} {path} line {number} is not valid JSON ({error.msg}): {fix}.") from None
        missing = [key for key in keys if key not in row] if isinstance(row, dict) else list(keys)
        if missing:
            got = f"an object without {missing}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise UserError(f"{what} {path} line {number}: expected a JSON object with {list(keys)}, got {got} "
                            f"({line.strip()[:60]!r}): {fix}.")
        yield number, row


def read_toml(path: str | Path, what: str, fix: str) -> dict:
    import tomllib

    text = read_text(path, what, fix, allow_empty=True)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{what} {path} is not a readable TOML file ({error}): {fix}.") from None


@contextmanager
def open_safetensors(path: str | Path, what: str, fix: str):
    """A safetensors file opened lazily (safetensors' `safe_open`): missing, empty, truncated or not safetensors,
    whatever error type the library raises (its `SafetensorError` is no OSError), and a tensor that can't be
    read, are one line."""
    from safetensors import safe_open

    path = existing_file(path, what, fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            yield _CheckedSafetensors(f, path, what, fix)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ... for damage
        raise UserError(f"{what} {path} is not a readable safetensors file ({_reason(error)}): {fix}.") from None


class _CheckedSafetensors:
    """safe_open's handle, whose tensor reads name the file when they fail (a file cut after its header)."""

    def __init__(self, handle, path: Path, what: str, fix: str):
        self.handle, self.path, self.what, self.fix = handle, path, what, fix

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def metadata(self) -> dict[str, str]:
        return self.handle.metadata() or {}

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self.handle.keys():
            raise UserError(f"{self.what} {self.path} has no tensor {name!r}: {self.fix}.")
        try:
            return self.handle.get_tensor(name)
        except Exception as error:  # noqa: BLE001
            raise UserError(f"{self.what} {self.path}: tensor {name} can't be read ({_reason(error)}): "
                            f"{self.fix}.") from None

    def get_slice(self, name: str):
        return self.handle.get_slice(name)


def read_safetensors(path: str | Path, what: str, fix: str, names: list[str] | None = None,
                     finite: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors (`names`, default all) and its header's metadata, in one open; `finite`: NaN/inf in a
    floating tensor is the file's fault, named."""
    with open_safetensors(path, what, fix) as f:
        tensors = {name: f.get_tensor(name) for name in (names if names is not None else f.keys())}
        metadata = f.metadata()
    if finite:
        check_finite(tensors, path, what, fix)
    return tensors, metadata


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path, what: str, fix: str) -> None:
    """NaN/inf in a tensor read from `path` is that file's fault: one line naming it and the tensor."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{what} {path} holds NaN/inf values ({len(bad)} tensor(s), e.g. {bad[0]}): {fix}.")


def open_image(path: str | Path, what: str = "image", fix: str = "fix or remove it"):
    """A PIL image, loaded (so a truncated file fails here, not mid-training)."""
    from PIL import Image

    path = existing_file(path, what, fix)
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Exception as error:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, DecompressionBombError...
        raise UserError(f"{what} {path} is not a readable image ({error.__class__.__name__}: {_reason(error)}): "
                        f"{fix}.") from None

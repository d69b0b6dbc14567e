"""Captioned images from a local folder or a Hub dataset, keyed by the sha256 of their pixels.

Both scripts read the data through `load_samples`, so an image always gets the same key: the embeddings
cache and the latents cache are looked up by that key, never by position (a shuffled loader can't pair an
image with another image's caption).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from flux_qlora import readers
from flux_qlora.errors import UserError

__all__ = ["UserError"]  # documented as flux_qlora.data.UserError: kept importable from here

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MASK_SUFFIX = "_mask"  # NAME_mask.png beside NAME.jpg: where the loss counts (white) and where not (black)


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on (the alpha can be the loss mask instead)


def image_hash(image: Image.Image) -> str:
    """sha256 of the pixels that train (`to_rgb`): for an 8-bit RGB image its decoded bytes, as diffusers'
    research-project `compute_embeddings.py` computes it."""
    return hashlib.sha256(to_rgb(image).tobytes()).hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB pixels an image trains as, for every mode PIL opens: EXIF orientation applied, 16-bit and
    float greys scaled to 8 bits (a bare convert("RGB") clips them to white), transparency composited on
    `BACKGROUND` (a bare convert shows whatever colour the transparent pixels happen to hold)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        sixteen_bit = image.mode.startswith("I;16") or array.max() > 255  # mode I: 16-bit PNGs, or 8-bit values
        top = 1.0 if image.mode == "F" and array.max() <= 1 else 65535.0 if sixteen_bit else 255.0
        image = Image.fromarray(np.clip(array / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "PA", "LA", "La", "RGBa") or "A" in image.getbands():
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (*BACKGROUND, 255)), image)
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class Sample:
    image_hash: str
    caption: str
    source: str  # a file path or "dataset[index]", for messages
    open_image: Callable[[], Image.Image] = field(repr=False)
    open_mask: Callable[[], Image.Image] | None = field(default=None, repr=False)


def _open_file(path: Path, what: str = "image") -> Callable[[], Image.Image]:
    def open_image() -> Image.Image:
        return readers.open_image(path, what)

    return open_image


def _read_metadata_jsonl(folder: Path, caption_column: str) -> dict[str, str]:
    fix = f"write UTF-8 lines, each a JSON object with 'file_name' and '{caption_column}' (set --caption_column)"
    return {str(row["file_name"]): str(row[caption_column])
            for _, row in readers.read_jsonl(folder / "metadata.jsonl", "captions file", ("file_name", caption_column),
                                             fix)}


def _caption_for(path: Path, metadata: dict[str, str] | None, instance_prompt: str | None) -> str | None:
    if metadata is not None and path.name in metadata:
        caption = metadata[path.name]
    elif path.with_suffix(".txt").exists():
        caption = readers.read_text(path.with_suffix(".txt"), "caption file", "save the caption as UTF-8 text",
                                    allow_empty=True)
    else:
        caption = None
    caption = caption.strip() if caption else ""
    return caption or instance_prompt


def load_local_samples(instance_data_dir: str, caption_column: str, instance_prompt: str | None,
                       flag: str = "--instance_data_dir", fallback_flag: str = "--instance_prompt") -> list[Sample]:
    """Images in a folder, captioned by `metadata.jsonl`, a `.txt` file beside each image, or `instance_prompt`.
    `flag` / `fallback_flag`: the flags the messages name (the regularisation set has its own)."""
    folder = Path(instance_data_dir)
    if not folder.is_dir():
        raise UserError(f"{flag} {folder} is not a folder: give the folder that holds your images.")
    paths = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.stem.endswith(MASK_SUFFIX))
    if not paths:
        raise UserError(f"{flag} {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    metadata = _read_metadata_jsonl(folder, caption_column) if (folder / "metadata.jsonl").exists() else None
    samples, uncaptioned, unreadable, first_problem = [], [], [], ""
    for path in paths:
        caption = _caption_for(path, metadata, instance_prompt)
        if caption is None:
            uncaptioned.append(path.name)
            continue
        try:
            image = _open_file(path)()
        except UserError as error:
            unreadable.append(path.name)
            first_problem = first_problem or str(error)
            continue
        mask = path.with_name(f"{path.stem}{MASK_SUFFIX}.png")
        samples.append(Sample(image_hash(image), caption, str(path), _open_file(path),
                              _open_file(mask, "mask") if mask.exists() else None))
    if unreadable:
        raise UserError(f"{len(unreadable)} unreadable image(s) in {folder}: {_first(unreadable)}; fix or remove them "
                        f"(the first: {first_problem.removesuffix(': fix or remove it.')}).")
    if uncaptioned:
        raise UserError(
            f"{len(uncaptioned)} image(s) in {folder} have no caption (no .txt beside them, no metadata.jsonl "
            f"entry): {_first(uncaptioned)}. Add captions or pass {fallback_flag} as a fallback caption."
        )
    return samples


def load_hub_samples(
    dataset_name: str, image_column: str, caption_column: str, instance_prompt: str | None,
    dataset_config_name: str | None = None, split: str = "train", cache_dir: str | None = None,
) -> list[Sample]:
    """Rows of a `datasets` dataset (a Hub id or anything `load_dataset` accepts)."""
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset_name needs the datasets library: `pip install datasets`.") from None
    dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    for column in (image_column,) + ((caption_column,) if instance_prompt is None else ()):
        if column not in dataset.column_names:
            raise UserError(
                f"dataset {dataset_name} has no column {column!r}; its columns are {dataset.column_names}. "
                "Set --image_column / --caption_column."
            )
    samples, uncaptioned = [], []
    for index, row in enumerate(dataset):
        caption = str(row.get(caption_column) or "").strip() or instance_prompt
        if caption is None:
            uncaptioned.append(f"row {index}")
            continue
        samples.append(Sample(image_hash(row[image_column]), caption, f"{dataset_name}[{index}]",
                              lambda index=index: dataset[index][image_column]))
    if uncaptioned:
        raise UserError(f"{len(uncaptioned)} row(s) of {dataset_name} have an empty caption: {_first(uncaptioned)}. "
                        "Pass --instance_prompt as a fallback caption.")
    return samples


def load_samples(*, dataset_name: str | None, instance_data_dir: str | None, caption_column: str,
                 instance_prompt: str | None, image_column: str = "image", dataset_config_name: str | None = None,
                 dataset_split: str = "train", cache_dir: str | None = None) -> list[Sample]:
    """The samples of a Hub dataset (`dataset_name`) or a local folder, duplicates dropped."""
    if dataset_name:
        samples = load_hub_samples(dataset_name, image_column, caption_column, instance_prompt,
                                   dataset_config_name, dataset_split, cache_dir)
    else:
        samples = load_local_samples(instance_data_dir, caption_column, instance_prompt)
    return drop_duplicates(samples)


def drop_duplicates(samples: list[Sample]) -> list[Sample]:
    seen: dict[str, Sample] = {}
    duplicates = []
    for sample in samples:
        if sample.image_hash in seen:
            duplicates.append(f"{sample.source} = {seen[sample.image_hash].source}")
        else:
            seen[sample.image_hash] = sample
    if duplicates:
        logger.warning("%d duplicate image(s) skipped (same pixels): %s", len(duplicates), _first(duplicates))
    return list(seen.values())


def check_resolution(width: int, height: int) -> None:
    for name, value in (("--width", width), ("--height", height)):
        if value <= 0 or value % 16:
            raise UserError(f"{name} {value} must be a positive multiple of 16 (the VAE downsamples 8x and "
                            f"Flux packs 2x2 latents); try {max(16, round(value / 16) * 16)}.")


def resize_to_cover(image: Image.Image, width: int, height: int, mode: str = "RGB") -> torch.Tensor:
    """uint8 tensor (channels, H, W) of the image in `mode` (RGB; L for masks), scaled so that it covers
    width x height (H >= height, W >= width), uncropped."""
    image = to_rgb(image) if mode == "RGB" else ImageOps.exif_transpose(image).convert(mode)
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).reshape(size[1], size[0], -1).permute(2, 0, 1)


def open_mask(sample: Sample, image: Image.Image, alpha: bool) -> Image.Image | None:
    """The sample's loss mask: its NAME_mask.png, or with `alpha` the image's alpha channel; None when it has
    neither (the whole image counts). A mask must be the size of its image."""
    if sample.open_mask is not None:
        mask = sample.open_mask()
    elif alpha and "A" in image.getbands():
        mask = ImageOps.exif_transpose(image).getchannel("A")
    else:
        return None
    if mask.size != image.size:
        raise UserError(f"the mask of {sample.source} is {mask.width}x{mask.height}, the image "
                        f"{image.width}x{image.height}: make the mask the size of its image.")
    return mask


def crop(pixels: torch.Tensor, width: int, height: int, left: int | None = None, top: int | None = None,
         flip: bool = False) -> torch.Tensor:
    """A width x height window of (3, H, W) pixels at (left, top) (default: centered), mirrored with `flip`."""
    left = (pixels.shape[2] - width) // 2 if left is None else left
    top = (pixels.shape[1] - height) // 2 if top is None else top
    window = pixels[:, top : top + height, left : left + width]
    return window.flip(-1) if flip else window


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")

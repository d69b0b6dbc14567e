"""Aspect-ratio buckets: training sizes of about one pixel area in several shapes, so portraits, landscapes and
squares each train whole instead of center-cropped to one size.

`--resolution 512` makes the sizes of about 512x512 pixels whose sides are multiples of `--bucket_step` (64 by
default: few shapes, so few compilations and CUDA graphs) with aspect ratios from 1:2.5 to 2.5:1; each image goes
to the bucket nearest its own aspect ratio, is scaled to cover it and cropped. Several resolutions
(`--resolution 512,768,1024`) train each image at each of them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from flux_qlora.data import check_resolution
from flux_qlora.errors import UserError

Size = tuple[int, int]  # (width, height) in pixels
MAX_ASPECT = 2.5  # the most elongated bucket: 2.5:1 either way
MAX_UPSCALE = 2.0  # an image smaller than its bucket by more than this per side is refused


def parse_resolutions(text: str, step: int) -> list[int]:
    """'512,768' -> [512, 768]: each a positive multiple of the bucket step."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--resolution {text}: give whole numbers of pixels, e.g. 512 or 512,768,1024.") from None
    bad = [v for v in values if v <= 0 or v % step]
    if not values or bad:
        value = bad[0] if bad else text
        raise UserError(f"--resolution {value} is not a multiple of --bucket_step {step} (bucket sides are): try "
                        f"{max(step, round(int(value) / step) * step) if bad else 512}.")
    return sorted(set(values))


def make_buckets(resolution: int, step: int = 64, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution^2 pixels, sides multiples of `step`, from the tallest to the
    widest; the square resolution x resolution is always one of them."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(resolution, int(resolution * math.sqrt(max_aspect)) + step, step):  # landscapes, mirrored
        height = max(step, round(area / width / step) * step)
        if 1 <= width / height <= max_aspect:
            buckets |= {(width, height), (height, width)}
    # One bucket per aspect ratio: of two sizes with the same ratio, the one nearer the area.
    by_ratio = {}
    for w, h in sorted(buckets, key=lambda b: abs(b[0] * b[1] - area)):
        by_ratio.setdefault(round(w / h, 3), (w, h))
    return sorted(by_ratio.values(), key=lambda b: b[0] / b[1])


def check_size_flags(resolution: str | None, step: int, width: int | None, height: int | None) -> tuple[int, int]:
    """Checks --resolution / --bucket_step / --width / --height; returns the size validation images are drawn at:
    --width x --height (default 512x512), or with buckets the first resolution's square."""
    if step < 16 or step % 16:
        raise UserError(f"--bucket_step {step} must be a positive multiple of 16; try 64.")
    if resolution:
        if width or height:
            raise UserError("give --resolution (aspect-ratio buckets) or --width/--height (one size), not both.")
        first = parse_resolutions(resolution, step)[0]
        return first, first
    width, height = width or 512, height or 512
    check_resolution(width, height)
    return width, height


@dataclass(frozen=True)
class TrainingSizes:
    """The sizes a run trains at, resolved once from the size flags: each resolution's buckets (--resolution), or
    the one --width x --height; and the size its validation images are drawn at."""

    lists: tuple[tuple[Size, ...], ...]  # one list per resolution (each image trains at its nearest of each)
    bucketed: bool
    validation: Size  # --width x --height (default 512x512), or with buckets the first resolution's square
    resolutions: tuple[int, ...] = ()  # --resolution's, sorted, each once

    @property
    def largest(self) -> Size:
        """The size of the most pixels: it sets the memory plan's peak."""
        return max((size for sizes in self.lists for size in sizes), key=lambda s: s[0] * s[1])

    @property
    def count(self) -> int:
        return sum(len(sizes) for sizes in self.lists)

    def describe(self) -> str:
        """For people: '512x768', or 'buckets of ~512x512, ~1024x1024 pixels'."""
        if not self.bucketed:
            return "{}x{}".format(*self.lists[0][0])
        return "buckets of " + ", ".join(f"~{r}x{r}" for r in self.resolutions) + " pixels"


def resolve_sizes(resolution: str | None, step: int, width: int | None, height: int | None) -> TrainingSizes:
    """The size flags, checked (`check_size_flags`), as `TrainingSizes`."""
    validation = check_size_flags(resolution, step, width, height)
    if not resolution:
        return TrainingSizes(((validation,),), False, validation)
    resolutions = tuple(parse_resolutions(resolution, step))
    return TrainingSizes(tuple(tuple(make_buckets(r, step)) for r in resolutions), True, validation, resolutions)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log space: 2:1 is as far from 1:1 as 1:2)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def check_not_too_small(width: int, height: int, bucket: tuple[int, int], source: str) -> None:
    scale = max(bucket[0] / width, bucket[1] / height)
    if scale > MAX_UPSCALE:
        raise UserError(f"image {source} is {width}x{height}, too small for its {bucket[0]}x{bucket[1]} bucket "
                        f"(it would be upscaled {scale:.1f}x): use a smaller --resolution or remove the image.")


MAX_COVER_AREA = 16  # the scaled image may hold at most this many times its training size's pixels


def check_not_too_elongated(width: int, height: int, size: tuple[int, int], source: str) -> None:
    """An image far more elongated than its training size would be scaled to a huge strip before the crop (a 10x8000
    banner at 512x512 becomes 512x409600): refused instead of exhausting memory."""
    scale = max(size[0] / width, size[1] / height)
    if width * height * scale * scale > MAX_COVER_AREA * size[0] * size[1]:
        raise UserError(f"{source} ({width}x{height}) is too elongated for {size[0]}x{size[1]} (the crop would keep "
                        f"{100 * size[0] * size[1] / (width * height * scale * scale):.0f}% of it): crop the image, "
                        "or train with --resolution (aspect-ratio buckets).")


def histogram(sizes: list[tuple[int, int]]) -> str:
    """'512x768: 12, 768x512: 3, ...' of the items per bucket, for the log."""
    counts = Counter(sizes)
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items(), key=lambda kv: kv[0][0] / kv[0][1]))

"""A tiny Flux-shaped pipeline (FLUX.1, FLUX.2 [klein] or [dev]) and a small captioned image set, built offline
and deterministically.

The demo (`make demo`) and the tests run the real scripts on these: same classes, same folder layout and
same shape rules as the real models (2x2 latent packing, sizes in multiples of 16), only far smaller and random.

    python -m flux_qlora.tiny --output_dir demo_output   # writes tiny-flux/ and tiny-images/
    python -m flux_qlora.tiny --output_dir demo_output --family flux2-klein   # tiny-flux2-klein/ instead
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

from flux_qlora.families import FAMILY_NAMES, by_name

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square")


def build_tiny_pipeline(output_dir: str | Path, seed: int = 0, family: str = "flux1") -> Path:
    """Writes a pipeline folder of `family` (model_index.json + subfolders) with random weights; returns its path.
    Each family's module builds its own (`Family.build_tiny_pipeline`)."""
    return by_name(family).build_tiny_pipeline(Path(output_dir), seed)


def tiny_caption(index: int) -> tuple[str, str, str]:
    color = list(COLORS)[index % len(COLORS)]
    shape = SHAPES[(index // len(COLORS)) % len(SHAPES)]
    background = list(COLORS)[(index + 2) % len(COLORS)]
    return color, shape, background


def build_tiny_images(output_dir: str | Path, count: int = 8, size: tuple[int, int] = (96, 80)) -> Path:
    """Writes `count` PNGs (shapes of a colour on a background) each with a `.txt` caption beside it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        color, shape, background = tiny_caption(i)
        image = Image.new("RGB", size, COLORS[background])
        draw = ImageDraw.Draw(image)
        x, y, r = rng.randint(30, size[0] - 30), rng.randint(30, size[1] - 30), rng.randint(14, 24)
        box = (x - r, y - r, x + r, y + r)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        image.save(output_dir / f"{i:03d}.png")
        (output_dir / f"{i:03d}.txt").write_text(f"a {color} {shape} on a {background} background")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the tiny Flux-shaped pipeline and image set.")
    parser.add_argument("--output_dir", type=str, default="demo_output", help="Where tiny-flux/ and tiny-images/ go.")
    parser.add_argument("--num_images", type=int, default=8, help="How many captioned images to write.")
    parser.add_argument("--family", choices=FAMILY_NAMES, default="flux1", help="Which model family's pipeline.")
    args = parser.parse_args()
    folder = "tiny-flux" if args.family == "flux1" else f"tiny-{args.family}"
    model = build_tiny_pipeline(Path(args.output_dir) / folder, family=args.family)
    images = build_tiny_images(Path(args.output_dir) / "tiny-images", count=args.num_images)
    print(f"tiny pipeline: {model}\ntiny images:   {images}")


if __name__ == "__main__":
    main()

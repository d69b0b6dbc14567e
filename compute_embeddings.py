#!/usr/bin/env python
"""Caches the text embeddings of every caption once, so training never loads the text encoders: T5 and CLIP for
FLUX.1, Qwen3 for FLUX.2 [klein], Mistral Small 3.1 for FLUX.2 [dev] (the family is read from the model).

    python compute_embeddings.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --instance_data_dir my_images --output_path embeddings.parquet \\
        --validation_prompt "a yarn art dog"

Rows are keyed by the sha256 of each image's pixels (see flux_qlora/embeddings.py for the layout). Re-running
only computes what changed: new images, edited captions; an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flux_qlora import families
from flux_qlora.cli import (
    add_config_arg,
    add_dataset_args,
    add_model_args,
    check_dataset_args,
    class_samples,
    dataset_kwargs,
    eval_samples,
    hub_kwargs,
    parse_args_with_config,
    run_main,
    setup_logging,
)
from flux_qlora.data import Sample, drop_duplicates, load_samples
from flux_qlora.embeddings import EmbeddingsWriter, prompt_key, reusable_rows
from flux_qlora.errors import UserError
from flux_qlora.families import Family
from flux_qlora.hardware import check_device
from flux_qlora.models import load_text_pipeline

logger = logging.getLogger("compute_embeddings")

MAX_T5_LENGTH = 512  # FLUX.1-dev's T5 was trained with at most 512 tokens; the FLUX.2 pipelines' limit too


def build_parser() -> argparse.ArgumentParser:
    """Every flag of this script (docs/flags.md is generated from it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_dataset_args(parser)
    parser.add_argument("--output_path", type=str, default="embeddings.parquet", help="The parquet file to write.")
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help=f"Text tokens per caption (1 to {MAX_T5_LENGTH}); longer captions are truncated. "
                        "Default: 77 (FLUX.1, FLUX.2 [klein]: its chat template takes ~12 of them), 128 (FLUX.2 "
                        "[dev]: its system message takes ~35).")
    parser.add_argument("--validation_prompt", type=str, action="append", default=[],
                        help="A prompt to embed for validation images during training (repeatable).")
    parser.add_argument("--batch_size", type=int, default=8, help="Captions encoded per forward pass.")
    parser.add_argument("--quantize_text_encoder", choices=("8bit", "nf4"), default=None,
                        help="Load the big text encoder (T5-XXL, Qwen3, Mistral Small 3.1) in 8 bits or NF4 "
                        "(bitsandbytes, CUDA only): FLUX.2 [dev]'s 24 B encoder needs nf4 on a 24 GB card.")
    parser.add_argument("--t5_8bit", action="store_true", help="The same as --quantize_text_encoder 8bit.")
    parser.add_argument("--device", type=str, default=None, help="Encoder device (default: cuda if available).")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    add_config_arg(parser)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    return parse_args_with_config(build_parser(), input_args)


def validate_args(args: argparse.Namespace) -> None:
    check_dataset_args(args)
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_T5_LENGTH:
        raise UserError(f"--max_sequence_length {args.max_sequence_length} must be between 1 and {MAX_T5_LENGTH} "
                        "(77 is the default; 512 for long captions).")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size} must be at least 1.")
    check_device("--device", args.device)
    if not Path(args.output_path).parent.exists():
        raise UserError(f"--output_path {args.output_path}: folder {Path(args.output_path).parent} does not exist.")


def embedding_source(args: argparse.Namespace, max_sequence_length: int) -> dict:
    """What the embeddings depend on besides the caption: a cache made from another source is recomputed."""
    return {"pretrained_model_name_or_path": args.pretrained_model_name_or_path, "revision": args.revision,
            "max_sequence_length": max_sequence_length}


def rows_to_compute(samples: list[Sample], prompts: list[str], known: dict[str, str]) -> list[tuple[str, str]]:
    """(key, caption) pairs whose embeddings are not already known with that exact caption."""
    rows = [(s.image_hash, s.caption) for s in samples] + [(prompt_key(p), p) for p in prompts]
    return [(key, caption) for key, caption in rows if known.get(key) != caption]


@torch.no_grad()
def encode_rows(family: Family, pipe, rows: list[tuple[str, str]], writer: EmbeddingsWriter, batch_size: int,
                length: int) -> None:
    for start in tqdm(range(0, len(rows), batch_size), desc="Encoding captions", unit="batch"):
        keys, captions = zip(*rows[start : start + batch_size])
        prompt_embeds, pooled, text_ids = family.encode_prompts(pipe, list(captions), length)
        writer.write(list(keys), list(captions), prompt_embeds, pooled, text_ids)


def main(args: argparse.Namespace) -> None:
    validate_args(args)
    regularisation, held_out = class_samples(args), eval_samples(args)
    samples = drop_duplicates(load_samples(**dataset_kwargs(args)) + regularisation + held_out)
    extras = [(regularisation, "regularisation", args.class_data_dir), (held_out, "eval", args.eval_data_dir)]
    logger.info("%d images with captions from %s%s", len(samples), args.dataset_name or args.instance_data_dir,
                "".join(f" (with {len(extra)} {what} images from {folder})" for extra, what, folder in extras if extra))

    family = families.detect_pipeline(args.pretrained_model_name_or_path, revision=args.revision,
                                      cache_dir=args.cache_dir)
    length = args.max_sequence_length or family.default_max_sequence_length
    source = embedding_source(args, length)
    writer = EmbeddingsWriter(args.output_path, source, family.name)
    reusable = reusable_rows(args.output_path, source)
    # The empty caption too: what the trainer's --caption_dropout trains on.
    prompts = list(dict.fromkeys([*args.validation_prompt, ""]))
    rows = rows_to_compute(samples, prompts, {**reusable, **writer.done_rows()})
    logger.info("%d captions to encode (%d reused from earlier runs)", len(rows),
                len(samples) + len(prompts) - len(rows))
    if rows:
        device = str(check_device("--device", args.device))
        quantize = args.quantize_text_encoder or ("8bit" if args.t5_8bit else None)
        pipe = load_text_pipeline(family, args.pretrained_model_name_or_path, device, quantize, **hub_kwargs(args))
        encode_rows(family, pipe, rows, writer, args.batch_size, length)
        del pipe

    keep = list(dict.fromkeys([s.image_hash for s in samples] + [prompt_key(p) for p in prompts]))
    count = writer.finish(keep, reuse=Path(args.output_path) if reusable else None)
    logger.info("Wrote %d rows (%d images, %d validation prompts, the empty caption) of %s embeddings to %s", count,
                len(samples), len(prompts) - 1, family.label, args.output_path)


if __name__ == "__main__":
    args = parse_args()
    setup_logging(args.debug)
    run_main(main, args, memory_fix="Use less: --quantize_text_encoder nf4, a smaller --batch_size, or --device cpu.")

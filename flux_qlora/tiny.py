"""A tiny Flux-shaped pipeline and a small captioned image set, built offline and deterministically.

The demo (`make demo`) and the tests run the real scripts on these: same classes, same folder layout and
same shape rules as FLUX.1-dev (2x2 latent packing, sizes in multiples of 16), only far smaller and random.

    python -m flux_qlora.tiny --output_dir demo_output   # writes tiny-flux/ and tiny-images/
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

TINY_T5_DIM = 32  # joint_attention_dim of the tiny transformer
TINY_CLIP_DIM = 32  # pooled_projection_dim of the tiny transformer
TINY_LATENT_CHANNELS = 4  # the transformer's in_channels is 4x this (2x2 packing)

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square")


def write_clip_tokenizer(folder: Path) -> None:
    """A character-level byte-BPE vocabulary: CLIPTokenizer loads it from vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to code points from 256 on.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)


def write_t5_tokenizer(folder: Path) -> None:
    """A Unigram `tokenizer.json` over single characters, loaded by transformers as a T5 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(folder)


def build_tiny_pipeline(output_dir: str | Path, seed: int = 0) -> Path:
    """Writes a FluxPipeline folder (model_index.json + subfolders) with random weights; returns its path."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * TINY_LATENT_CHANNELS,
        num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=TINY_T5_DIM,  # inner dim 64, as NF4 likes
        pooled_projection_dim=TINY_CLIP_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    # Four blocks = three 2x downsamples: the VAE halves 8x and packing 2x, so sizes must be multiples of 16.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=TINY_LATENT_CHANNELS, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64,
        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=TINY_CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=TINY_CLIP_DIM,
        bos_token_id=512, eos_token_id=513, pad_token_id=513,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=64, d_model=TINY_T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    from transformers import AutoTokenizer, CLIPTokenizer

    with tempfile.TemporaryDirectory() as staging:
        write_clip_tokenizer(Path(staging) / "clip")
        write_t5_tokenizer(Path(staging) / "t5")
        pipe = FluxPipeline(
            scheduler=scheduler, vae=vae, transformer=transformer,
            text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(Path(staging) / "clip"),
            text_encoder_2=text_encoder_2, tokenizer_2=AutoTokenizer.from_pretrained(Path(staging) / "t5"),
        )
    pipe.save_pretrained(output_dir)
    return output_dir


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
    args = parser.parse_args()
    model = build_tiny_pipeline(Path(args.output_dir) / "tiny-flux")
    images = build_tiny_images(Path(args.output_dir) / "tiny-images", count=args.num_images)
    print(f"tiny pipeline: {model}\ntiny images:   {images}")


if __name__ == "__main__":
    main()

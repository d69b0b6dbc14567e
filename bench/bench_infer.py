#!/usr/bin/env python
"""Inference benchmark on a FLUX.1-dev-shaped pipeline with random weights: bf16 eager vs compile + FP8 + hotswap.

    python bench/bench_infer.py --workdir /dev/shm/fi

Builds the whole pipeline with FLUX.1-dev's shapes in GPU memory (transformer, VAE, T5-XXL- and CLIP-L-shaped
encoders; locally built tokenizers) and three random LoRAs of ranks 8, 16 and 32 on the attention layers, then
runs infer.py's main() on it (everything but the loading from disk): the baseline (bf16, eager, rank-16 LoRA)
and the optimized server (all three LoRAs hotswapped into one compiled FP8 transformer), 1024x1024, 28 steps,
guidance 3.5, VAE decode included.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import FLUX_DEV_SCHEDULER, FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE  # noqa: E402

PROMPT = "a photo of a red fox sitting in a snowy forest at dawn, detailed fur, soft light"
LORA_RANKS = (8, 16, 32)


def build_pipeline(tokenizer_dir: Path):
    """The whole pipeline in memory on the GPU (bf16, random weights): building beats writing and reading 35 GB."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from flux_qlora.tiny import write_clip_tokenizer, write_t5_tokenizer

    if not (tokenizer_dir / "t5").exists():
        write_clip_tokenizer(tokenizer_dir / "clip")
        write_t5_tokenizer(tokenizer_dir / "t5")
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                     is_encoder_decoder=False, tie_word_embeddings=False))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            projection_dim=768, bos_token_id=512, eos_token_id=513, pad_token_id=513))
        vae = AutoencoderKL(**FLUX_DEV_VAE)
        torch.set_default_dtype(torch.float32)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae, transformer=transformer,
        text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir / "clip"),
        text_encoder_2=t5, tokenizer_2=AutoTokenizer.from_pretrained(tokenizer_dir / "t5"),
    )


def build_loras(folder: Path) -> list[Path]:
    """Random LoRAs (diffusers format) on every attention projection, ranks 8/16/32."""
    from safetensors.torch import save_file

    d = FLUX_DEV_TRANSFORMER["attention_head_dim"] * FLUX_DEV_TRANSFORMER["num_attention_heads"]
    names = [f"transformer_blocks.{i}.attn.{t}" for i in range(FLUX_DEV_TRANSFORMER["num_layers"])
             for t in ("to_q", "to_k", "to_v", "to_out.0")]
    names += [f"single_transformer_blocks.{i}.attn.{t}" for i in range(FLUX_DEV_TRANSFORMER["num_single_layers"])
              for t in ("to_q", "to_k", "to_v")]
    files = []
    for rank in LORA_RANKS:
        path = folder / f"lora-r{rank}.safetensors"
        if not path.exists():
            g = torch.Generator().manual_seed(rank)
            state = {}
            for name in names:
                state[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, d, generator=g) / d**0.5).bfloat16()
                state[f"transformer.{name}.lora_B.weight"] = (torch.randn(d, rank, generator=g) * 0.01).bfloat16()
            folder.mkdir(parents=True, exist_ok=True)
            save_file(state, path)
        files.append(path)
    return files


def run_infer(name: str, flags: list, workdir: Path) -> list[dict]:
    """infer.main on a freshly built pipeline (its own LoRA, FP8 and compile code paths; only loading skipped)."""
    import infer

    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    pipe = build_pipeline(workdir / "tokenizers")
    print(f"{name}: pipeline built in {time.time() - start:.0f} s", flush=True)
    args = infer.parse_args(["--prompt", PROMPT, "--height", "1024", "--width", "1024", "--num_inference_steps", "28",
                             "--guidance_scale", "3.5", "--output_dir", str(workdir / "out" / name),
                             *map(str, flags)])
    try:
        rounds = infer.main(args, pipe=pipe)
    except Exception as error:  # report and go on with the next configuration
        print(f"{name} FAILED: {error!r}", flush=True)
        return []
    for r in rounds:
        r.update(config=name)
        print(json.dumps({k: v for k, v in r.items() if k != "files"}), flush=True)
    del pipe
    gc.collect()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm/fi"))
    parser.add_argument("--images", type=int, default=3, help="Timed images per LoRA (after one warm-up image).")
    parser.add_argument("--configs", nargs="+", default=["baseline", "optimized"],
                        choices=["baseline", "compiled", "optimized", "optimized-tensor", "optimized-full"])
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    loras = build_loras(args.workdir / "loras")
    common = ["--benchmark", args.images]
    configs = {
        "baseline": ["--lora", loras[1]],
        "compiled": ["--hotswap", *sum((["--lora", p] for p in loras), []), "--compile"],
        "optimized": ["--hotswap", *sum((["--lora", p] for p in loras), []), "--compile", "--fp8"],
        "optimized-tensor": ["--hotswap", *sum((["--lora", p] for p in loras), []), "--compile", "--fp8", "tensor"],
        "optimized-full": ["--hotswap", *sum((["--lora", p] for p in loras), []), "--compile", "full", "--fp8"],
    }
    results = []
    for name in args.configs:
        results += run_infer(name, common + configs[name], args.workdir)
    if args.results:
        args.results.write_text(json.dumps(results, indent=2))
    print(f"\n{'config':<15} {'lora':<22} {'s/image':>8} {'first image s':>13} {'new graphs':>10} {'peak GiB':>8}")
    for r in results:
        print(f"{r['config']:<15} {Path(r['lora']).name[:22]:<22} {r['s_per_image']:>8.2f} {r['first_image_s']:>13.1f} "
              f"{r['new_graphs']:>10} {r['peak_memory_gib']:>8.1f}")


if __name__ == "__main__":
    main()

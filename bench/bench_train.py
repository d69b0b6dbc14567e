#!/usr/bin/env python
"""Training benchmark on a FLUX-shaped model with random weights (the real config: real memory, real speed).

    python bench/bench_train.py --workdir /dev/shm/fluxbench --configs nf4-ckpt-512x768 nf4-ckpt-1024x1024
    python bench/bench_train.py --model flux2-klein-4b --workdir /dev/shm/klein4b --configs nf4-ckpt-1024x1024

Builds (once) the transformer and VAE with the real configs of --model (FLUX.1-dev, FLUX.2 [klein] 4B/9B), eight
random images and their embeddings parquet (77 tokens of the model's text width, random), then runs
train_qlora_flux.py itself for each configuration and prints median s/step (first step excluded), peak allocated
and reserved memory and tokens per second. Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from flux_qlora.families import Family
from flux_qlora.families.flux1 import FLUX1, FLUX_DEV_CONFIG
from flux_qlora.families.flux2 import DEV, DEV_CONFIG, KLEIN, KLEIN_4B_CONFIG, KLEIN_9B_CONFIG

ROOT = Path(__file__).resolve().parents[1]

FLUX_DEV_TRANSFORMER = FLUX_DEV_CONFIG
FLUX_DEV_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=1024, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
    use_post_quant_conv=False,
)
# --model -> (family, transformer config)
MODELS = {"flux1-dev": (FLUX1, FLUX_DEV_TRANSFORMER), "flux2-klein-4b": (KLEIN, KLEIN_4B_CONFIG),
          "flux2-klein-9b": (KLEIN, KLEIN_9B_CONFIG), "flux2-dev": (DEV, DEV_CONFIG)}
# FLUX.2 [dev]'s 32 B are 64 GB in bf16, more than the GPU machine's disk and half its RAM: built straight into NF4
# (bench/build_nf4_model.py), so it benchmarks the NF4 base only.
BUILT_IN_NF4 = {"flux2-dev"}
FLUX_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096)

# name -> (width, height, extra trainer flags): {NF4, bf16, FP8-trained bf16 base} x {checkpointing, none} x sizes
BASES = {"nf4": ["--base_precision", "nf4"], "bf16": ["--base_precision", "bf16"],
         "fp8": ["--base_precision", "bf16", "--do_fp8_training"]}
CONFIGS = {
    f"{base}{'-ckpt' if ckpt else ''}-{w}x{h}": (w, h, [*flags, *(["--gradient_checkpointing"] if ckpt else [])])
    for base, flags in BASES.items() for ckpt in (True, False) for w, h in ((512, 768), (1024, 1024), (512, 512))
}


# name -> (resolution, trainer flags): aspect-ratio buckets (--resolution) over the mixed-aspect images
BUCKET_CONFIGS = {"nf4-ckpt-buckets512": (512, ["--base_precision", "nf4", "--gradient_checkpointing"])}
MIXED_SIZES = [(1152, 896), (1024, 1024), (896, 1152)]  # -> the 576x448, 512x512 and 448x576 buckets at 512


# Issue 6's matrix: NF4 and bf16 base with and without checkpointing, FP8 with it, at 512x768 and 1024x1024.
MATRIX = [name for name in CONFIGS
          if not name.endswith("512x512") and (not name.startswith("fp8") or "-ckpt-" in name)]


def build_model(folder: Path, family: Family = FLUX1, config: dict = FLUX_DEV_TRANSFORMER, nf4: bool = False) -> None:
    """A transformer of `config` (random weights, built on the GPU: bf16, or with `nf4` straight into NF4) + the
    family's VAE + scheduler, in pipeline layout."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    if (folder / "transformer" / "config.json").exists():
        return
    start = time.time()
    torch.manual_seed(0)
    if nf4:
        from build_nf4_model import build_nf4_transformer

        build_nf4_transformer(folder / "transformer", family, config)
    else:
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            transformer = family.transformer_cls().from_config(config)
            torch.set_default_dtype(torch.float32)
        transformer.save_pretrained(folder / "transformer", max_shard_size="10GB")
        del transformer
    torch.cuda.empty_cache()
    vae = AutoencoderKL(**FLUX_DEV_VAE) if family is FLUX1 else AutoencoderKLFlux2()  # FLUX.2's: the defaults
    vae.to(torch.bfloat16).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER).save_pretrained(folder / "scheduler")
    print(f"built {family.label}-shaped model in {folder} ({time.time() - start:.0f} s)", flush=True)


def build_data(folder: Path, count: int = 8, sizes: list[tuple[int, int]] = ((1024, 1024),), family: Family = FLUX1,
               config: dict = FLUX_DEV_TRANSFORMER) -> Path:
    """Random images (sizes taken in turn) with captions, and an embeddings parquet of the model's shapes (77
    tokens of its text width; FLUX.1's pooled CLIP vector) keyed by their hashes."""
    import numpy as np
    from PIL import Image

    from flux_qlora.data import image_hash
    from flux_qlora.embeddings import EmbeddingsWriter

    parquet = folder / "embeddings.parquet"
    if parquet.exists():
        return parquet
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = EmbeddingsWriter(parquet, {"pretrained_model_name_or_path": "bench"}, family.name)
    text_width, pooled_width = config["joint_attention_dim"], config.get("pooled_projection_dim", 0)
    text_ids = family.text_ids(77)
    keys = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        image.save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"random image {i}")
        keys.append(image_hash(image))
        writer.write(keys[-1:], [f"random image {i}"], torch.randn(1, 77, text_width), torch.randn(1, pooled_width),
                     text_ids)
    writer.finish(keys)
    return parquet


def launcher(gpu_profile: str | None) -> list[str]:
    """accelerate launch with accelerate.yaml (one GPU, bf16), or one process on an emulated smaller GPU
    (bench/emulate_gpu.py; run_config adds the profile's precision: fp16 on the T4, which has no bf16)."""
    if gpu_profile is None:
        return [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
                str(ROOT / "accelerate.yaml")]
    return [sys.executable, str(ROOT / "bench" / "emulate_gpu.py"), gpu_profile]


def run_config(name: str, workdir: Path, steps: int, extra: list[str], gpu_profile: str | None = None,
               fresh_compile_cache: bool = False, env_vars: dict[str, str] | None = None, rank: int = 4) -> dict:
    if name in BUCKET_CONFIGS:  # buckets of about resolution^2 pixels over the mixed-aspect images
        resolution, flags = BUCKET_CONFIGS[name]
        width = height = resolution
        data, size = workdir / "mixed", ["--resolution", str(resolution)]
    else:
        width, height, flags = CONFIGS[name]
        data, size = workdir / "data", ["--width", str(width), "--height", str(height)]
    if gpu_profile:
        extra = [*extra, "--mixed_precision", "fp16" if gpu_profile == "t4" else "bf16"]
    tag = "".join(f.strip("-")[:3] for f in extra if f.startswith("--")) + (f"-{gpu_profile}" if gpu_profile else "")
    tag += "".join(f"-{k[:8].lower()}{v}" for k, v in (env_vars or {}).items())  # passes differing only in env
    output = workdir / "runs" / f"{name}{'-' + tag if tag else ''}"
    command = [
        *launcher(gpu_profile),
        str(ROOT / "train_qlora_flux.py"), "--pretrained_model_name_or_path", str(workdir / "model"),
        "--instance_data_dir", str(data / "images"), "--data_df_path", str(data / "embeddings.parquet"),
        "--output_dir", str(output), *size, "--rank", str(rank), "--use_8bit_adam", "--cache_latents",
        "--max_train_steps", str(steps), "--checkpointing_steps", "100000", "--report_to", "none", "--logging_steps",
        "10", "--profile_dir", str(output / "profile"), "--overwrite_output_dir",  # a rerun replaces the last one
        *flags, *extra,
    ]
    start = time.time()
    import os
    import tempfile

    env = {**os.environ, **(env_vars or {})}
    if fresh_compile_cache:  # a local inductor cache of its own, empty: what a new machine starts with
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-", dir=workdir)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"config": name, "error": result.stderr[-2000:]}
    summary = json.loads((output / "train_summary.json").read_text())
    tokens = (width // 16) * (height // 16) + 77
    label = f"buckets ~{width}x{height}" if name in BUCKET_CONFIGS else f"{width}x{height}"
    return {"config": name, "resolution": label, "s_per_step": summary["median_s_per_step"],
            "gpu_profile": gpu_profile, "predicted_gib": summary["predicted_peak_gpu_memory_gib"],
            "skipped_steps": summary["skipped_steps"], "training_sizes": summary["training_sizes"],
            "recompiles": summary["recompiles"], "cuda_graphs_captured": summary["cuda_graphs_captured"],
            "graphs_compiled": summary["graphs_compiled"], "compile_cache_hits": summary["compile_cache_hits"],
            "compile_cache_bypasses": summary["compile_cache_bypasses"],
            "seconds_since_launch": summary["seconds_since_launch"],
            "peak_gib": summary["peak_gpu_memory_gib"], "reserved_gib": summary["peak_reserved_gpu_memory_gib"],
            "model_gib": summary["model_gpu_memory_gib"],
            "gpu_busy_percent": summary["gpu_busy_percent"], "tokens_per_s": tokens / summary["median_s_per_step"],
            "wall_s": time.time() - start, "final_loss": summary["final_loss"], "losses": summary["losses"],
            "flags": " ".join(flags),
            "extra": " ".join(extra), "env": " ".join(f"{k}={v}" for k, v in (env_vars or {}).items())}


ENV_TOKEN = re.compile(r"[A-Z][A-Z0-9_]*=.*")  # NAME=VALUE in an --extra pass


def split_env(tokens: list[str]) -> tuple[list[str], dict[str, str]]:
    """An --extra pass's trainer flags and its environment variables (the NAME=VALUE tokens, NAME in capitals)."""
    env = dict(t.split("=", 1) for t in tokens if ENV_TOKEN.fullmatch(t))
    return [t for t in tokens if not ENV_TOKEN.fullmatch(t)], env


def run_reference(width: int, height: int, workdir: Path, steps: int, rank: int = 4) -> dict:
    """bench/reference_recipe.py: the libraries' standard QLoRA calls, on the same model, sizes and rank."""
    command = [sys.executable, str(ROOT / "bench" / "reference_recipe.py"), "--model", str(workdir / "model"),
               "--width", str(width), "--height", str(height), "--steps", str(steps), "--rank", str(rank)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        return {"config": "reference", "resolution": f"{width}x{height}", "error": result.stderr[-2000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm/fluxbench"))
    parser.add_argument("--model", choices=list(MODELS), default="flux1-dev",
                        help="Whose real config the random model has (each in a --workdir of its own).")
    parser.add_argument("--configs", nargs="+", default=["nf4-ckpt-512x768"], metavar="NAME",
                        choices=[*CONFIGS, *BUCKET_CONFIGS, "matrix"],
                        help=f"Configurations to run ({', '.join(CONFIGS)}), or 'matrix' = issue 6's whole matrix: "
                             "{512x768, 1024x1024} x {checkpointing, none} x {NF4, bf16 base}, and the FP8 path with "
                             "checkpointing.")
    parser.add_argument("--steps", type=int, default=25, help="Optimizer steps per configuration.")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of every run, the reference recipe's too.")
    parser.add_argument("--extra", type=str, action="append", default=[],
                        help="Trainer flags for one more pass over --configs, e.g. --extra='--compile' (repeatable; "
                             "the plain flags always run first); NAME=VALUE tokens set that pass's environment, e.g. "
                             "--extra='TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 --compile'. Each later pass's losses are "
                             "compared step by step with the first pass's (largest relative difference).")
    parser.add_argument("--skip_plain", action="store_true", help="Run only the --extra passes.")
    parser.add_argument("--skip_reference", action="store_true",
                        help="Don't run the plain library recipe (bench/reference_recipe.py) at each NF4 size.")
    parser.add_argument("--results", type=Path, default=None, help="Write the results as JSON here.")
    parser.add_argument("--env", type=str, action="append", default=[], metavar="KEY=VALUE",
                        help="An environment variable for the trainer runs, e.g. TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 "
                             "(inductor's Triton GEMM templates, into which it can fuse the NF4 dequantization).")
    parser.add_argument("--fresh_compile_cache", action="store_true",
                        help="Each run with empty local inductor caches (a new machine's cold start): --extra "
                             "'--compile_cache_dir DIR' then measures a warm start from DIR alone.")
    parser.add_argument("--gpu_profile", type=str, nargs="+", default=[None], choices=["t4", "24gb", "12gb", "8gb"],
                        help="Run the trainer on emulated smaller GPUs (bench/emulate_gpu.py: memory cap; the T4's "
                             "compute capability 7.5 and fp16), each profile over each of --configs.")
    args = parser.parse_args()
    if args.skip_plain and not args.extra:
        parser.error("--skip_plain runs only the --extra passes, and there are none: add --extra='...' or drop it")

    if "matrix" in args.configs:
        args.configs = MATRIX
    family, config = MODELS[args.model]
    build_model(args.workdir / "model", family, config, nf4=args.model in BUILT_IN_NF4)
    build_data(args.workdir / "data", family=family, config=config)
    if any(name in BUCKET_CONFIGS for name in args.configs):
        build_data(args.workdir / "mixed", count=9, sizes=MIXED_SIZES, family=family, config=config)
    results, reference = [], {}
    if not args.skip_reference:
        for w, h in sorted({CONFIGS[name][:2] for name in args.configs if name.startswith("nf4") and name in CONFIGS}):
            reference[f"{w}x{h}"] = run_reference(w, h, args.workdir, args.steps, args.rank)
            results.append(reference[f"{w}x{h}"])
            print(json.dumps(results[-1]), flush=True)
    passes = ([] if args.skip_plain else [""]) + args.extra
    common_env = dict(kv.split("=", 1) for kv in args.env)
    for extra, profile, name in itertools.product(passes, args.gpu_profile, args.configs):
        flags, env = split_env(extra.split())
        results.append(run_config(name, args.workdir, args.steps, flags, profile, args.fresh_compile_cache,
                                  {**common_env, **env}, args.rank))
        base = reference.get(results[-1].get("resolution"), {})
        if "s_per_step" in base and "s_per_step" in results[-1]:
            results[-1]["speedup_vs_reference"] = base["s_per_step"] / results[-1]["s_per_step"]
        first = next(r for r in results if r["config"] == name and r.get("gpu_profile") == profile)
        if "losses" in first and "losses" in results[-1] and first is not results[-1]:
            results[-1]["loss_diff_vs_first_pass"] = largest_relative_difference(results[-1]["losses"],
                                                                                 first["losses"])
        print(json.dumps(results[-1]), flush=True)
        if args.results:  # after every run: a long invocation cut short keeps what it measured
            args.results.write_text(json.dumps(results, indent=2))
    print_table(results)


def largest_relative_difference(losses: list[float], baseline: list[float]) -> float:
    """The largest |loss - baseline| / |baseline| over the steps both runs have: is a speed-up the same run?"""
    return max((abs(a - b) / abs(b) for a, b in zip(losses, baseline)), default=float("nan"))


def print_table(results: list[dict]) -> None:
    print(f"\n{'config':<22} {'extra flags':<32} {'WxH':>18} {'s/step':>7} {'peak GiB':>8} {'reserved':>8} "
          f"{'model GiB':>9} {'GPU busy':>8} {'tokens/s':>8} {'vs ref':>7} {'predicted':>9} {'loss diff':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['config']:<22} {r.get('resolution', '')} ERROR: {r['error'][-300:]}")
            continue
        speedup = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else "-"
        tokens = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        print(f"{r['config']:<22} {r.get('extra', '')[:32]:<32} {r['resolution']:>18} {r['s_per_step']:>7.3f} "
              f"{r['peak_gib']:>8.2f} {r.get('reserved_gib', 0):>8.2f} {r['model_gib']:>9.2f} "
              f"{r.get('gpu_busy_percent') or 0:>7.0f}% {tokens:>8} {speedup:>7} {r.get('predicted_gib') or 0:>9.2f} "
              f"{r.get('loss_diff_vs_first_pass', float('nan')):>9.1e}")

if __name__ == "__main__":
    main()

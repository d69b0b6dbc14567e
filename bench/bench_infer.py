#!/usr/bin/env python
"""Inference benchmark on a FLUX-shaped pipeline with random weights: bf16 eager vs compile + FP8 + hotswap.

    python bench/bench_infer.py --workdir /dev/shm/fi --configs baseline fused-all optimized-graphs --diagnose \
        --profile_dir /tmp/prof
    python bench/bench_infer.py --model flux2-klein-4b --workdir /dev/shm/ki4b --configs baseline fused-all

Builds the whole pipeline with --model's shapes in GPU memory (FLUX.1-dev: transformer, VAE, T5-XXL- and
CLIP-L-shaped encoders; FLUX.2 [klein] 4B/9B: transformer, VAE, a Qwen3-4B/8B-shaped encoder, distilled; locally
built tokenizers) and three random LoRAs of ranks 8, 32 and 16 on the default preset's layers, then runs infer.py's
main() on it (everything but the loading from disk) for each configuration: the baseline (bf16, eager, rank-16
LoRA) and servers that take all three LoRAs in turn through one compiled FP8 transformer (`configs` in main()),
1024x1024, the model's serving steps and guidance (FLUX.1-dev 28 at 3.5; distilled klein 4 without), VAE decode
included. --diagnose adds an SDPA backend
comparison, GPU time per pipeline stage and, with --profile_dir, kernel tables and each configuration's distance
from the baseline's latents.

    python bench/bench_infer.py --workdir /dev/shm/fi --gpu_profile t4 --configs nf4-fp16-free

With --gpu_profile (bench/emulate_gpu.py: t4, 24gb, 12gb, 8gb) the pipeline is written to the workdir once and each
configuration runs infer.py as a user would, loading from that folder, in a process whose GPU memory is capped to
the profile's (the T4's capability too): whether it fits, s/image (the H200's speed) and the process's peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path

import torch
from bench_train import (  # bench/ is the script's folder
    FLUX_DEV_SCHEDULER,
    FLUX_DEV_TRANSFORMER,
    FLUX_DEV_VAE,
    MODELS,
    ROOT,
    launcher,
)

from flux_qlora.families import Family
from flux_qlora.families.flux1 import FLUX1
from flux_qlora.reports import kernel_seconds, write_profile_tables

PROMPT = "a photo of a red fox sitting in a snowy forest at dawn, detailed fur, soft light"
INDUCTOR_SETTINGS = {"fused-all-mk": {"triton.multi_kernel": 1}}  # inductor settings to try, by configuration
LORA_RANKS = (8, 32, 16)  # served in this order: the last, rank 16, is the baseline's, for the accuracy check
# The released text encoders' shapes, by the transformer's text width (3 x the encoder's hidden size): Qwen3-4B
# (klein 4B), Qwen3-8B (klein 9B).
QWEN3_CONFIGS = {
    7680: dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    12288: dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}


def serving_flags(family: Family) -> list[str]:
    """Steps and guidance as the model card serves it: FLUX.1-dev 28 at 3.5, distilled klein 4 without."""
    return ["--num_inference_steps", "28", "--guidance_scale", "3.5"] if family is FLUX1 else \
        ["--num_inference_steps", "4", "--guidance_scale", "1.0"]


def build_pipeline(tokenizer_dir: Path, model: str = "flux1-dev"):
    """The whole pipeline in memory on the GPU (bf16, random weights): building beats writing and reading 35 GB."""
    family, config = MODELS[model]
    if family is not FLUX1:
        return build_klein_pipeline(tokenizer_dir, config)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from flux_qlora.families.flux1 import write_clip_tokenizer, write_t5_tokenizer

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


def build_klein_pipeline(tokenizer_dir: Path, config: dict):
    """FLUX.2 [klein] (distilled) of `config`'s shapes with the matching Qwen3-shaped encoder, in GPU memory."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flux_qlora.families.flux2 import qwen_tokenizer

    tokenizer = qwen_tokenizer(tokenizer_dir / "qwen")
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        transformer = Flux2Transformer2DModel.from_config(config)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_CONFIGS[config["joint_attention_dim"]],
                                                    max_position_embeddings=40960, rope_theta=1e6,
                                                    pad_token_id=tokenizer.pad_token_id))
        vae = AutoencoderKLFlux2()
        torch.set_default_dtype(torch.float32)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae,
                              transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              is_distilled=True)


def build_loras(folder: Path, family: Family = FLUX1, config: dict = FLUX_DEV_TRANSFORMER) -> list[Path]:
    """Random LoRAs (diffusers format) on the layers of the trainer's default preset (`attention`) of a transformer
    of `config`, ranks 8/32/16; shapes read from a skeleton of it."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    from flux_qlora.lora import is_target, target_modules

    with init_empty_weights():
        skeleton = family.transformer_cls().from_config(config)
    targets = target_modules("attention", family, config)
    layers = {name: module for name, module in skeleton.named_modules()
              if isinstance(module, torch.nn.Linear) and is_target(name, targets)}
    files = []
    for rank in LORA_RANKS:
        path = folder / f"lora-r{rank}.safetensors"
        if not path.exists():
            g = torch.Generator().manual_seed(rank)
            state = {}
            for name, layer in layers.items():
                d_in, d_out = layer.in_features, layer.out_features
                state[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5
                                                              ).bfloat16()
                state[f"transformer.{name}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01
                                                              ).bfloat16()
            folder.mkdir(parents=True, exist_ok=True)
            save_file(state, path)
        files.append(path)
    return files


def attention_microbench(tokens: int = 4608, heads: int = 24, head_dim: int = 128) -> list[dict]:
    """Forward SDPA at FLUX's 1024x1024 shape for each PyTorch backend: TFLOP/s and error against flash."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    attend = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        reference = attend(q, k, v).float()
    rows = []
    for name, backend in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel(backend) if backend else nullcontext():
                error = float((attend(q, k, v).float() - reference).abs().max())
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    attend(q, k, v)
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 20
            rows.append({"backend": name, "ms": round(ms, 3), "max_abs_err_vs_flash": error,
                         "tflops": round(4 * tokens**2 * head_dim * heads / ms / 1e9)})
        except RuntimeError as failure:
            rows.append({"backend": name, "error": str(failure)[:200]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


class StageTimer:
    """GPU time spent in named methods (CUDA events around each call; wrapping the methods, not hooks, so
    compiled modules and CUDA-graph replays are timed too), over one image."""

    def __init__(self, methods: dict[str, tuple[object, str]]):
        self.pairs: dict[str, list] = {name: [] for name in methods}
        self.originals = []
        for name, (owner, attr) in methods.items():
            self.originals.append((owner, attr, owner.__dict__.get(attr)))
            setattr(owner, attr, self._timed(name, getattr(owner, attr)))

    def _timed(self, name: str, method):
        def call(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = method(*args, **kwargs)
            end.record()
            self.pairs[name].append((start, end))
            return output
        return call

    def seconds(self) -> dict[str, float]:
        torch.cuda.synchronize()
        for owner, attr, original in self.originals:
            if original is None:
                delattr(owner, attr)  # the class's method again
            else:
                setattr(owner, attr, original)
        return {name: round(sum(a.elapsed_time(b) for a, b in pairs) / 1e3, 4) for name, pairs in self.pairs.items()}


def diagnose(pipe, name: str, out_dir: Path | None, serving: list[str]) -> dict:
    """Where one image's time goes: GPU seconds per stage, and (with out_dir) a profile of one more image."""
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    call = dict(prompt=PROMPT, height=1024, width=1024, num_inference_steps=int(serving[1]),
                guidance_scale=float(serving[3]), generator=torch.Generator("cpu").manual_seed(0))
    encoders = {attr: (getattr(pipe, attr), "forward") for attr in ("text_encoder", "text_encoder_2")
                if getattr(pipe, attr, None) is not None}
    timer = StageTimer({**encoders, "transformer": (pipe.transformer, "forward"), "vae_decode": (pipe.vae, "decode")})
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(**call)
    torch.cuda.synchronize()
    report = {"config": name, "wall_s": round(time.perf_counter() - start, 3), "gpu_s": timer.seconds()}
    if out_dir is not None:  # for latent_errors()
        latents = pipe(**{**call, "output_type": "latent", "generator": torch.Generator("cpu").manual_seed(0)}).images
        torch.save(latents.float().cpu(), out_dir / f"{name}-latents.pt")

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            pipe(**call)
            torch.cuda.synchronize()
        report["profiled_kernel_s"] = round(kernel_seconds(prof), 3)
        write_profile_tables(prof, out_dir, prefix=f"{name}-", rows=50)
    print("DIAGNOSE " + json.dumps(report), flush=True)
    return report


def latent_errors(folder: Path, configs: list[str]) -> dict[str, float]:
    """Relative L2 distance of each configuration's final latents (rank-16 LoRA, seed 0) from the baseline's."""
    if not (folder / "baseline-latents.pt").exists():
        return {}
    reference = torch.load(folder / "baseline-latents.pt")
    errors = {name: float((torch.load(folder / f"{name}-latents.pt") - reference).norm() / reference.norm())
              for name in configs if (folder / f"{name}-latents.pt").exists()}
    print("LATENT ERRORS " + json.dumps(errors), flush=True)
    return errors


# Configurations for the emulated smaller GPUs (--gpu_profile), each serving the rank-16 LoRA. Without --fuse the
# transformer loads straight into NF4 with the LoRA unmerged on it (the quick-start notebook's path on Colab, whose
# VM has 12.7 GB of RAM); with --fuse it is merged in full precision, then re-quantized. fp16 on the T4.
CAPPED_CONFIGS = {
    "nf4-fp16": ["--quantize", "nf4", "--quantize_t5", "--dtype", "fp16"],
    "nf4-fp16-free": ["--quantize", "nf4", "--quantize_t5", "--free_text_encoders", "--dtype", "fp16"],  # the T4's
    "nf4-bf16": ["--quantize", "nf4", "--quantize_t5", "--dtype", "bf16"],
    "nf4-fused-bf16-t5": ["--fuse", "--quantize", "nf4", "--dtype", "bf16"],  # T5 in bf16 (9.5 GB): 24 GB cards
}


def write_pipeline(folder: Path, model: str = "flux1-dev") -> Path:
    """The --model-shaped pipeline on disk (bf16 shards; FLUX.1-dev ~33 GB), as infer.py loads a real one; built
    once."""
    if not (folder / "model_index.json").exists():
        start = time.time()
        pipe = build_pipeline(folder.parent / "tokenizers", model)
        pipe.save_pretrained(folder, max_shard_size="10GB")
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
        print(f"pipeline written to {folder} in {time.time() - start:.0f} s", flush=True)
    return folder


def run_capped(name: str, flags: list, profile: str, workdir: Path, lora: Path, images: int,
               model: str = "flux1-dev") -> list[dict]:
    """infer.py in its own process under the profile's memory cap, loading the pipeline from disk."""
    import subprocess

    out = workdir / "out" / f"{profile}-{name}"
    command = [*launcher(profile), str(ROOT / "infer.py"),
               "--pretrained_model_name_or_path", str(write_pipeline(workdir / "pipeline", model)), "--lora", str(lora),
               "--prompt", PROMPT, "--height", "1024", "--width", "1024", *serving_flags(MODELS[model][0]),
               "--benchmark", str(images), "--output_dir", str(out), *flags]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        print(f"{profile}/{name} FAILED ({result.returncode}) after {wall:.0f} s:\n{result.stderr[-3000:]}", flush=True)
        return [{"config": f"{profile}/{name}", "failed": result.stderr.strip().splitlines()[-1:]}]
    rounds = json.loads((out / "benchmark.json").read_text())
    for r in rounds:
        r.update(config=f"{profile}/{name}", wall_s_with_loading=round(wall, 1))
        print(json.dumps({k: v for k, v in r.items() if k != "files"}), flush=True)
    return rounds


def run_infer(name: str, flags: list, workdir: Path, diagnose_dir: Path | None = None,
              diagnostics: list | None = None, model: str = "flux1-dev") -> list[dict]:
    """infer.main on a freshly built pipeline (its own LoRA, FP8 and compile code paths; only loading skipped)."""
    import torch._inductor.config

    import infer

    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    pipe = build_pipeline(workdir / "tokenizers", model)
    print(f"{name}: pipeline built in {time.time() - start:.0f} s", flush=True)
    serving = serving_flags(MODELS[model][0])
    args = infer.parse_args(["--prompt", PROMPT, "--height", "1024", "--width", "1024", *serving,
                             "--output_dir", str(workdir / "out" / name), *map(str, flags)])
    try:
        with torch._inductor.config.patch(INDUCTOR_SETTINGS.get(name, {})):
            rounds = infer.main(args, pipe=pipe)
    except Exception as error:  # report and go on with the next configuration
        print(f"{name} FAILED: {error!r}", flush=True)
        return []
    for r in rounds:
        r.update(config=name)
        print(json.dumps({k: v for k, v in r.items() if k != "files"}), flush=True)
    if diagnostics is not None:
        diagnostics.append(diagnose(pipe, name, diagnose_dir, serving))
    del pipe
    gc.collect()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm/fi"))
    parser.add_argument("--model", choices=[m for m in MODELS if m != "flux2-dev"], default="flux1-dev",
                        help="Whose real shapes the random pipeline has (each in a --workdir of its own).")
    parser.add_argument("--images", type=int, default=3, help="Timed images per LoRA (after one warm-up image).")
    parser.add_argument("--configs", nargs="+", default=["baseline", "optimized"],
                        help="Configurations, in order (see `configs` in main()).")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--diagnose", action="store_true",
                        help="Also: SDPA backends at the 1024x1024 shape, GPU time per stage of one image.")
    parser.add_argument("--profile_dir", type=Path, default=None,
                        help="With --diagnose: profile one more image per configuration, kernel tables here.")
    parser.add_argument("--gpu_profile", type=str, default=None, choices=["t4", "24gb", "12gb", "8gb"],
                        help="Run CAPPED_CONFIGS through infer.py under this emulated GPU (bench/emulate_gpu.py).")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    loras = build_loras(args.workdir / "loras", *MODELS[args.model])
    common = ["--benchmark", args.images]
    all_loras = sum((["--lora", p] for p in loras), [])
    optimized = ["--hotswap", *all_loras, "--compile", "--fp8"]
    configs = {
        "baseline": ["--lora", loras[-1]],
        "fused": ["--hotswap", "fused", *all_loras, "--compile", "--fp8", "--cuda_graphs"],
        "fused-all": ["--hotswap", "fused", *all_loras, "--compile", "all", "--fp8", "--cuda_graphs"],
        "fused-all-mk": ["--hotswap", "fused", *all_loras, "--compile", "all", "--fp8", "--cuda_graphs"],
        "compiled": ["--hotswap", *all_loras, "--compile"],
        "optimized": optimized,
        "optimized-graphs": [*optimized, "--cuda_graphs"],
        "optimized-cudnn": [*optimized, "--attention_backend", "_native_cudnn"],
        "optimized-flash": [*optimized, "--attention_backend", "_native_flash"],
        "optimized-nolora": ["--compile", "--fp8"],
        "optimized-nolora-graphs": ["--compile", "--fp8", "--cuda_graphs"],
        "optimized-tensor": [*optimized, "tensor"],
        "optimized-full": ["--hotswap", *all_loras, "--compile", "full", "--fp8"],
    }
    if args.gpu_profile:
        results = [r for name in args.configs
                   for r in run_capped(name, CAPPED_CONFIGS[name], args.gpu_profile, args.workdir, loras[-1],
                                       args.images, args.model)]
        if args.results:
            args.results.write_text(json.dumps({"runs": results}, indent=2))
        return
    results, diagnostics = [], ([] if args.diagnose else None)
    if args.diagnose:
        diagnostics.append({"sdpa_1x24x4608x128": attention_microbench()})
    for name in args.configs:
        results += run_infer(name, common + configs[name], args.workdir, args.profile_dir, diagnostics, args.model)
    if args.profile_dir and diagnostics:
        diagnostics.append({"latents_error_vs_baseline": latent_errors(args.profile_dir, args.configs)})
    if args.results:
        args.results.write_text(json.dumps({"runs": results, "diagnostics": diagnostics}, indent=2))
    print(f"\n{'config':<15} {'lora':<22} {'s/image':>8} {'first image s':>13} {'new graphs':>10} {'peak GiB':>8}")
    for r in results:
        print(f"{r['config']:<15} {Path(r['lora']).name[:22]:<22} {r['s_per_image']:>8.2f} {r['first_image_s']:>13.1f} "
              f"{r['new_graphs']:>10} {r['peak_memory_gib']:>8.1f}")


if __name__ == "__main__":
    main()

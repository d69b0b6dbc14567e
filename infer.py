#!/usr/bin/env python
"""Generate images with FLUX.1 or FLUX.2 ([klein], [dev]; read from the model) and your LoRAs: load, blend, fuse
(+ re-quantize), or hotswap into a compiled transformer without recompiling.

    # one LoRA on the base pipeline
    python infer.py --lora my-flux-lora --prompt "a yarn art dog" --output_dir outputs
    # two LoRAs blended 0.8 / 0.5
    python infer.py --lora style-lora --lora_scale 0.8 --lora subject-lora --lora_scale 0.5 --prompt "..."
    # fuse into the transformer, save it, and run it re-quantized to NF4
    python infer.py --lora my-flux-lora --fuse --save_fused fused-transformer --quantize nf4 --prompt "..."
    # serve several LoRAs (any ranks) through one compiled FP8 transformer, timing each
    python infer.py --hotswap --lora a --lora b --lora c --compile --fp8 --benchmark 3 --prompt "..."
    # the same, fastest: each LoRA merged into the weights when swapped in, replayed from a CUDA graph
    python infer.py --hotswap fused --lora a --lora b --compile all --fp8 --cuda_graphs --prompt "..."
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from flux_qlora import families
from flux_qlora.blocks import compile_blocks_for_inference, fp8_eligible, set_attention_backend
from flux_qlora.cli import (
    add_attention_backend_arg,
    add_compile_cache_arg,
    add_config_arg,
    add_model_args,
    check_compile_cache_dir,
    hub_kwargs,
    parse_args_with_config,
    run_main,
    setup_logging,
)
from flux_qlora.compile_cache import load_compile_cache, save_compile_cache, start_compile_workers
from flux_qlora.convert import read_lora_file
from flux_qlora.cuda_graphs import replay_forward_from_cuda_graphs
from flux_qlora.data import check_resolution
from flux_qlora.errors import UserError
from flux_qlora.families import Family
from flux_qlora.files import writes_named
from flux_qlora.hardware import (
    Device,
    check_bf16,
    check_device,
    check_fp8_device,
    default_dtype,
    pick_attention_backend,
)
from flux_qlora.lora import LORA_WEIGHT_NAME, check_lora_matches, resolve_lora_file
from flux_qlora.models import DTYPES, count_nf4_layers, load_transformer, quantize_to_nf4
from flux_qlora.readers import read_text
from flux_qlora.reports import CompileCounter, peak_memory_gib
from flux_qlora.serving import Lora, LoraServer, make_server

logger = logging.getLogger("infer")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of this script (docs/flags.md is generated from it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    lora = parser.add_argument_group("LoRAs")
    lora.add_argument("--lora", type=str, action="append", default=[],
                      help="A LoRA: a .safetensors file, a folder holding one, or a Hub id (repeatable).")
    lora.add_argument("--weight_name", type=str, default=None,
                      help=f"File name inside a LoRA folder or Hub repo (default: {LORA_WEIGHT_NAME}).")
    lora.add_argument("--lora_scale", type=float, action="append", default=[],
                      help="Weight of each --lora, in order (repeatable; default 1.0 each): blends several LoRAs.")
    lora.add_argument("--fuse", action="store_true", help="Fuse the LoRA(s) into the transformer weights and unload.")
    lora.add_argument("--save_fused", type=str, default=None, help="With --fuse: save the fused transformer here.")
    lora.add_argument("--quantize", type=str, default=None, choices=["nf4"],
                      help="Run the transformer in NF4 (bitsandbytes); with --fuse, quantized after fusing "
                           "(dequantize -> merge -> re-quantize, not a lossy merge into 4-bit weights).")
    lora.add_argument("--hotswap", type=str, nargs="?", const="adapter", default=None, choices=["adapter", "fused"],
                      help="Serve each --lora in turn through one transformer, swapping weights in place: with "
                           "--compile, no recompilation. 'adapter' (default): peft's hotswap, LoRA layers kept "
                           "(ranks up to --hotswap_target_rank; later LoRAs target the first one's layers). "
                           "'fused': each LoRA merged into the weights (FP8 ones re-quantized) when swapped in: "
                           "no LoRA cost per image, any ranks and layers; keeps the targeted layers' original "
                           "weights in CPU memory.")
    lora.add_argument("--hotswap_target_rank", type=int, default=None,
                      help="Highest rank the hotswap slots hold (default: the highest rank among --lora).")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", type=str, action="append", default=[], help="A prompt (repeatable).")
    gen.add_argument("--prompt_file", type=str, default=None, help="A text file with one prompt per line.")
    gen.add_argument("--height", type=int, default=1024, help="Image height in pixels (a multiple of 16).")
    gen.add_argument("--width", type=int, default=1024, help="Image width in pixels (a multiple of 16).")
    gen.add_argument("--num_inference_steps", type=int, default=None,
                     help="Denoising steps (default: the model's: 28 FLUX.1, 50 FLUX.2 [dev] and [klein] base, 4 "
                     "[klein] distilled).")
    gen.add_argument("--guidance_scale", type=float, default=None,
                     help="Guidance (default: the model's: 3.5 FLUX.1, 4.0 FLUX.2, none for [klein] distilled).")
    gen.add_argument("--max_sequence_length", type=int, default=512, help="Text tokens per prompt.")
    gen.add_argument("--seed", type=int, default=0, help="Seed of the first image; image i uses seed + i.")
    gen.add_argument("--num_images", type=int, default=1, help="Images per prompt.")
    gen.add_argument("--output_dir", type=str, default="outputs", help="Where the PNGs go.")
    gen.add_argument("--dtype", type=str, default=None, choices=["bf16", "fp16", "fp32"],
                     help="Weight dtype of the pipeline (default: bf16, or fp16 on GPUs without bf16: T4, V100).")
    gen.add_argument("--device", type=str, default=None, help="Device (default: cuda if available).")

    fast = parser.add_argument_group("memory and speed")
    fast.add_argument("--cpu_offload", action="store_true", help="Model CPU offload: one component on the GPU at once.")
    fast.add_argument("--quantize_text_encoder", choices=("nf4", "8bit"), default=None,
                      help="Load the big text encoder (T5-XXL, Qwen3, Mistral Small 3.1) in NF4 or 8 bits (CUDA): "
                      "about a third / half of its bf16 memory; FLUX.2 [dev] on a 24 GB card needs nf4.")
    fast.add_argument("--quantize_t5", action="store_true", help="The same as --quantize_text_encoder nf4.")
    fast.add_argument("--free_text_encoders", action="store_true",
                      help="Encode every prompt first, then free the text encoders before generating: the same images "
                           "with ~6 GB less on the GPU (in fp16, T5's NF4 load keeps its 24 feed-forward output "
                           "layers in fp32, 4 GB). What a 16 GB card such as Colab's T4 needs at 1024x1024.")
    fast.add_argument("--compile", type=str, nargs="?", const="regional", default=None,
                      choices=["regional", "full", "all"],
                      help="torch.compile the transformer: 'regional' (default; compiles one block of each kind, "
                           "reused by all: fast warm-up), 'full' (fullgraph), or 'all': regional, plus T5's blocks "
                           "and the VAE decoder (a little faster per image, a longer warm-up: BENCHMARKS.md).")
    add_compile_cache_arg(fast)
    fast.add_argument("--fp8", type=str, nargs="?", const="row", default=None, choices=["row", "tensor"],
                      help="torchao float8 dynamic quantization of the transformer's linears (compute capability "
                           ">= 8.9: Ada, Hopper, Blackwell), with per-row (default, more accurate) or per-tensor "
                           "scales.")
    fast.add_argument("--cuda_graphs", action="store_true",
                      help="Replay the transformer's forward from a CUDA graph (captured on the first image's third "
                           "step), so the GPU never waits for Python between kernels; hotswaps need no new capture. "
                           "CUDA only; with --compile regional/all or no --compile.")
    add_attention_backend_arg(fast, "PyTorch SDPA, which picks flash/cuDNN on its own")
    fast.add_argument("--benchmark", type=int, default=0,
                      help="After one warm-up image, time N images per LoRA; print s/image and peak memory.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    add_config_arg(parser)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    return parse_args_with_config(build_parser(), input_args)


def validate_args(args: argparse.Namespace) -> None:
    check_resolution(args.width, args.height)
    if args.lora_scale and len(args.lora_scale) != len(args.lora):
        raise UserError(f"{len(args.lora_scale)} --lora_scale for {len(args.lora)} --lora: give one per LoRA or none.")
    if args.hotswap and (args.fuse or args.lora_scale or len(args.lora) < 1):
        raise UserError("--hotswap serves whole LoRAs one at a time: give --lora (one or more) and drop --fuse "
                        "and --lora_scale.")
    if args.save_fused and not args.fuse:
        raise UserError("--save_fused needs --fuse.")
    if args.save_fused and Path(args.save_fused).exists():
        raise UserError(f"--save_fused {args.save_fused} already exists: give a new folder (nothing is overwritten).")
    bad_scale = [s for s in args.lora_scale if not math.isfinite(s)]
    if bad_scale or not math.isfinite(args.guidance_scale or 0):
        raise UserError(f"--lora_scale / --guidance_scale {(bad_scale or [args.guidance_scale])[0]}: give a finite "
                        "number (e.g. 1.0 / 3.5).")
    if not 1 <= args.max_sequence_length <= 512:
        raise UserError(f"--max_sequence_length {args.max_sequence_length} must be between 1 and 512 (T5's limit "
                        "for Flux).")
    if args.fuse and not args.lora:
        raise UserError("--fuse needs at least one --lora.")
    if args.hotswap == "fused" and args.quantize:
        raise UserError("--hotswap fused re-writes the weights at each swap, which NF4 layers don't allow: drop "
                        "--quantize nf4 (use --fp8 or bf16), or use --hotswap adapter.")
    if args.fp8 and args.quantize:
        raise UserError("--fp8 and --quantize nf4 both quantize the transformer: choose one.")
    if args.cuda_graphs and (args.cpu_offload or args.compile == "full"):
        raise UserError("--cuda_graphs replays fixed weights and wraps the compiled blocks: drop --cpu_offload, and "
                        "use --compile regional or all rather than --compile full.")
    if args.free_text_encoders and args.cpu_offload:
        raise UserError("--cpu_offload already keeps T5 and CLIP off the GPU between uses: drop "
                        "--free_text_encoders (or --cpu_offload, which is slower).")
    check_compile_cache_dir(args)
    if args.num_images < 1 or (args.num_inference_steps is not None and args.num_inference_steps < 1):
        raise UserError("--num_images and --num_inference_steps must be at least 1.")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        text = read_text(args.prompt_file, "--prompt_file", "give a UTF-8 text file with one prompt per line")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts and not args.save_fused:
        raise UserError("no prompt: give --prompt (repeatable) or --prompt_file.")
    return prompts


def resolve_loras(args: argparse.Namespace, family: Family | None = None) -> list[Lora]:
    """Each --lora read once (a kohya file converted), checked to be usable LoRA weights, all finite."""
    scales = args.lora_scale or [1.0] * len(args.lora)
    # `family`: the model's (a ComfyUI/kohya file is read as its layers; without, FLUX.1's)
    loras = []
    for i, (source, scale) in enumerate(zip(args.lora, scales)):
        file = read_lora_file(resolve_lora_file(source, args.weight_name, args.cache_dir), family)
        rank = file.rank
        file.check_finite()
        loras.append(Lora(source, file, rank, scale, f"lora_{i}"))
    warn_about_base_precision(loras, "NF4" if args.quantize else "FP8" if args.fp8 else args.dtype)
    if args.hotswap == "adapter":
        target = args.hotswap_target_rank or max(lora.rank for lora in loras)
        too_big = [lora for lora in loras if lora.rank > target]
        if too_big:
            raise UserError(f"LoRA {too_big[0].source} has rank {too_big[0].rank}, above --hotswap_target_rank "
                            f"{target}: raise --hotswap_target_rank to at least {max(lo.rank for lo in loras)}.")
        args.hotswap_target_rank = target
    return loras


def warn_about_base_precision(loras: list[Lora], served: str) -> None:
    """One line per LoRA served on another base precision than it trained on (bf16, fp16 and fp32 count as one):
    users of NF4/FP8-trained LoRAs report their strength drifting on other bases."""
    for lora in loras:
        trained = lora.file.trained_base
        if trained and trained != served and not {trained, served} <= {"bf16", "fp16", "fp32"}:
            logger.warning("LoRA %s trained on a %s base and is served on a %s base: its strength can drift; compare "
                           "with %s, or adjust --lora_scale.", lora.source, trained, served,
                           {"NF4": "--quantize nf4", "FP8": "--fp8"}.get(trained, "no --quantize/--fp8"))


def pick_device(args) -> torch.device:
    """The device, with what it can't run refused before anything loads."""
    device = check_device("--device", args.device)
    hardware = Device.of(device)
    if args.dtype is None:
        args.dtype = default_dtype(hardware)
        if args.dtype != "bf16":
            logger.info("%s has no bf16: generating in %s (--dtype).", hardware.describe(), args.dtype)
    check_bf16("--dtype", args.dtype, hardware)
    pick_attention_backend(args.attention_backend, hardware, DTYPES[args.dtype], training=False)
    if args.fp8:
        check_fp8_device(hardware, "--fp8")
    if args.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda_graphs needs an NVIDIA GPU (this run is on the CPU): drop the flag.")
    if (args.quantize_t5 or args.quantize_text_encoder) and device.type != "cuda":
        raise UserError("--quantize_text_encoder / --quantize_t5 needs a CUDA GPU (bitsandbytes); drop it on the "
                        "CPU.")
    if advice := small_gpu_advice(hardware, args):
        logger.warning("%s", advice)
    return device


SMALL_GPU_GIB = 20  # FLUX.1-dev's transformer alone is 23.8 GB in bf16; NF4 + NF4 T5 held 14.19 GiB at 1024x1024


def small_gpu_advice(device: Device, args) -> str | None:
    """One line, before anything loads, when a GPU under 20 GiB is asked to hold what FLUX.1-dev needs more room
    for: the flags that make it fit (BENCHMARKS.md), or None."""
    if device.type != "cuda" or not device.memory_gib or device.memory_gib >= SMALL_GPU_GIB or args.cpu_offload:
        return None
    wanted = [("--quantize nf4", args.quantize == "nf4" or args.fp8),
              ("--quantize_text_encoder nf4", args.quantize_t5 or args.quantize_text_encoder),
              ("--free_text_encoders", args.free_text_encoders)]
    missing = [flag for flag, given in wanted if not given]
    if not missing:
        return None
    return (f"{device.describe()} has {device.memory_gib:.1f} GiB: FLUX.1-dev fits it with {' '.join(missing)} "
            "(or --cpu_offload, slower); without, expect to run out of GPU memory.")


def load_pipeline(args, device: torch.device, family: Family):
    """The pipeline of the model's family (FluxPipeline, Flux2Pipeline, Flux2KleinPipeline)."""
    dtype = DTYPES[args.dtype]
    common = {**hub_kwargs(args), "dtype": dtype}
    extra = {}
    quantize = args.quantize_text_encoder or ("nf4" if args.quantize_t5 else None)
    if quantize:
        extra[family.big_text_encoder] = family.load_big_text_encoder(args.pretrained_model_name_or_path, quantize,
                                                                      dtype, hub_kwargs(args))
    if args.quantize == "nf4" and not args.fuse:
        # Straight to NF4 on the device, one tensor at a time: the full-precision transformer (24 GB for
        # FLUX.1-dev) never sits in system RAM, which a Colab VM (12.7 GB) doesn't have.
        extra["transformer"] = load_transformer(args.pretrained_model_name_or_path, device, dtype,
                                                **hub_kwargs(args))
    pipe = family.pipeline_cls().from_pretrained(args.pretrained_model_name_or_path, **common, **extra)
    logger.info("Loaded %s (%s, %s)", args.pretrained_model_name_or_path, family.label, args.dtype)
    return pipe


def apply_loras(pipe, loras: list[Lora], args, device) -> LoraServer:
    """Loads, blends, fuses and (re-)quantizes, in the order that keeps the merge exact; returns the server of the
    rounds to generate (with --hotswap fused nothing is merged yet: `server.start()` merges on the GPU)."""
    family = family_of(pipe)
    for lora in loras:  # all of them before any work, hotswapped ones too
        if lora.file.trained_family:  # ours, with its training_config.toml beside it
            families.check_same_family(lora.file.trained_family, family, f"--lora {lora.source}",
                                       "serve it on the model family it was trained on")
        check_lora_matches(lora.file, pipe.transformer)
    if args.quantize == "nf4" and not args.fuse and not count_nf4_layers(pipe.transformer):  # (a pipe passed in)
        quantize_to_nf4(pipe.transformer, device)  # the LoRAs then sit unmerged on the NF4 layers
    try:
        server = make_server(args.hotswap, pipe, loras, args.hotswap_target_rank)
    except (ValueError, KeyError) as error:  # diffusers' loaders on a layout they can't map onto this model
        raise UserError(f"a --lora could not be loaded into this transformer ({str(error).splitlines()[0][:160]}): "
                        f"is it a LoRA for {family.label}?") from error
    if args.fuse:
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
        pipe.unload_lora_weights()
        logger.info("Fused %d LoRA(s) into the transformer", len(loras))
        if args.save_fused:
            with writes_named(Path(args.save_fused), "--save_fused"):
                pipe.transformer.save_pretrained(args.save_fused)
            logger.info("Saved the fused transformer to %s", args.save_fused)
        if args.quantize == "nf4":
            quantize_to_nf4(pipe.transformer, device)
    return server


def place_on_device(pipe, args, device) -> None:
    if args.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)


def speed_up(pipe, args, server: LoraServer) -> None:
    set_attention_backend(pipe.transformer, args.attention_backend)
    if args.fp8:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

        # set_inductor_config=False: torchao would otherwise turn on inductor's coordinate-descent tuning
        # process-wide, which took the compile warm-up from seconds to ~5 minutes (BENCHMARKS.md).
        config = Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if args.fp8 == "row" else PerTensor(), set_inductor_config=False)
        quantize_(pipe.transformer, config, filter_fn=fp8_eligible)
        server.use_fp8(config)
        logger.info("Transformer linears quantized to float8 (torchao, per-%s scales)", args.fp8)
    if args.compile:
        load_compile_cache(args.compile_cache_dir)
    if args.compile in ("regional", "all"):
        compile_blocks_for_inference(pipe.transformer)
    elif args.compile == "full":
        pipe.transformer.compile(fullgraph=True)
    if args.compile == "all":  # eager, T5 took 30-60 ms per image and the VAE decode 93 ms (slow group norms)
        for block in getattr(getattr(pipe.text_encoder_2, "encoder", None), "block", []):
            block.compile(dynamic=False)
        pipe.vae.decoder.compile(dynamic=False)
    if args.cuda_graphs:
        replay_forward_from_cuda_graphs(pipe.transformer)


def family_of(pipe) -> Family:
    return families.from_pipeline_class(type(pipe).__name__, "the pipeline")


def encode_prompts(pipe, prompts: list[str], args) -> dict[str, dict[str, torch.Tensor]]:
    """Each prompt's embeddings as the pipeline's call inputs, as it computes them when given the prompt (and the
    empty prompt's for the negative, where the pipeline guides with one: FLUX.2 [klein] base)."""
    family = family_of(pipe)
    with torch.no_grad():
        def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            prompt_embeds, pooled, _ = family.encode_prompts(pipe, [prompt], args.max_sequence_length)
            return prompt_embeds.to(pipe._execution_device), pooled.to(pipe._execution_device)

        guided = family.samples_with_negative and not pipe.config.get("is_distilled") and args.guidance_scale > 1
        negative = encode("") if guided else None
        return {prompt: family.sample_kwargs(*encode(prompt), negative) for prompt in dict.fromkeys(prompts)}


def free_text_encoders(pipe) -> None:
    """Drops the text encoders from the pipeline (and their GPU memory): the images are drawn from the embeddings."""
    names = family_of(pipe).text_encoders
    freed = sum(p.numel() * p.element_size() for name in names for p in getattr(pipe, name).parameters())
    for name in names:
        setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("Prompts encoded; the text encoders freed (%.1f GB)", freed / 1e9)


def draw(pipe, prompt: str, args, embeddings: dict | None, seed: int):
    """One image of `prompt` with the run's settings, from the prompt or, once the text encoders are freed, from
    its embeddings."""
    prompt_inputs = embeddings[prompt] if embeddings else {"prompt": prompt}
    return pipe(**prompt_inputs, height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def generate(pipe, prompts: list[str], args, lora_tag: str, embeddings: dict | None = None) -> list[Path]:
    from PIL.PngImagePlugin import PngInfo

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for prompt in prompts:
        for i in range(args.num_images):
            seed = args.seed + i
            image = draw(pipe, prompt, args, embeddings, seed)
            settings = {"prompt": prompt, "seed": seed, "steps": args.num_inference_steps,
                        "guidance_scale": args.guidance_scale, "size": f"{args.width}x{args.height}",
                        "model": args.pretrained_model_name_or_path, "loras": lora_tag}
            info = PngInfo()
            info.add_text("flux_qlora", json.dumps(settings))
            files.append(unused_path(output_dir / f"{_slug(lora_tag)}-{_slug(prompt)[:40]}-s{seed}.png"))
            image.save(files[-1], pnginfo=info)
    logger.info("Wrote %d image(s) to %s", len(files), output_dir)
    return files


def time_generations(pipe, prompt: str, args, device, embeddings: dict | None, memory: MemoryPeaks) -> dict:
    """Seconds per image (median of --benchmark runs, after the warm-up; each run's too) and peak memory: since
    launch, and (on a GPU) within the timed images, up to the VAE decode and during it. With --free_text_encoders
    the prompt was encoded before, so the times leave out T5 and CLIP."""
    times, stages = [], {}
    with memory.stages(pipe.vae, stages):
        for i in range(args.benchmark):
            _sync(device)
            start = time.perf_counter()
            draw(pipe, prompt, args, embeddings, seed=i)
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"s_per_image": sorted(times)[len(times) // 2], "times": [round(t, 3) for t in times],
            "peak_memory_gib": round(memory.since_launch(), 2), **{key: round(gib, 2) for key, gib in stages.items()}}


class MemoryPeaks:
    """Peak GPU memory since launch, and per stage of the timed images. torch keeps one peak counter, which the
    stages reset, so the launch peak is carried along here."""

    def __init__(self, device: torch.device):
        self.device, self.before_resets = device, 0.0

    def _read(self, reset: bool) -> float:
        gib = peak_memory_gib(self.device)
        self.before_resets = max(self.before_resets, gib)
        if reset and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return gib

    def since_launch(self) -> float:
        return max(self.before_resets, self._read(reset=False))

    @contextmanager
    def stages(self, vae, peaks: dict[str, float]):
        """Fills `peaks` with the peak (GiB) up to the VAE decode (text encoders, denoising: "denoising_peak_gib")
        and during it ("decode_peak_gib"), over the images generated inside; nothing on the CPU. It wraps
        `vae.decode`, outside what --compile all compiles (a hook inside the compiled decoder would recompile it)."""
        if self.device.type != "cuda":
            yield
            return
        decode = vae.decode

        def measured_decode(*args, **kwargs):
            peaks["denoising_peak_gib"] = max(peaks.get("denoising_peak_gib", 0.0), self._read(reset=True))
            output = decode(*args, **kwargs)
            peaks["decode_peak_gib"] = max(peaks.get("decode_peak_gib", 0.0), self._read(reset=True))
            return output

        vae.decode = measured_decode
        self._read(reset=True)
        try:
            yield
        finally:
            del vae.decode  # the class's method again


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unused_path(path: Path) -> Path:
    """`path`, or NAME-2.png, NAME-3.png, ... if it exists: earlier images are never overwritten."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[-60:] or "base"


def serve(pipe, server: LoraServer, prompts: list[str], args, device, embeddings: dict | None,
          memory: MemoryPeaks) -> list[dict]:
    """Generates (and with --benchmark times) each of the server's rounds: one, or one per hotswapped LoRA."""
    results = []
    for i, tag in enumerate(server.rounds):
        start = time.perf_counter()
        server.swap(i)
        graphs_before = CompileCounter.graphs_compiled()
        files = generate(pipe, prompts, args, tag, embeddings)  # the first image of the first round warms up
        result = {"lora": tag, "files": [str(f) for f in files], "first_image_s": time.perf_counter() - start}
        if args.benchmark:
            result.update(time_generations(pipe, prompts[0], args, device, embeddings, memory))
        result["new_graphs"] = CompileCounter.graphs_compiled() - graphs_before
        results.append(result)
        logger.info("%s", json.dumps({k: v for k, v in result.items() if k != "files"}))
    return results


def main(args: argparse.Namespace, pipe=None) -> list[dict]:
    """`pipe`: an already loaded pipeline (FluxPipeline, Flux2Pipeline, Flux2KleinPipeline) to use instead of
    loading one (notebooks, benchmarks)."""
    validate_args(args)
    prompts = read_prompts(args)
    device = pick_device(args)
    if args.compile:
        start_compile_workers(device)
    family = family_of(pipe) if pipe is not None else families.detect_pipeline(
        args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir)  # read once
    loras = resolve_loras(args, family)
    pipe = pipe if pipe is not None else load_pipeline(args, device, family)
    steps, guidance = family_of(pipe).serving_defaults(pipe.config)
    args.num_inference_steps = args.num_inference_steps or steps  # the model's defaults where not given
    args.guidance_scale = guidance if args.guidance_scale is None else args.guidance_scale
    server = apply_loras(pipe, loras, args, device)
    if not prompts:
        return []
    place_on_device(pipe, args, device)
    embeddings = encode_prompts(pipe, prompts, args) if args.free_text_encoders else None
    if embeddings:
        free_text_encoders(pipe)
    server.start()
    speed_up(pipe, args, server)
    results = serve(pipe, server, prompts, args, device, embeddings, MemoryPeaks(device))
    save_compile_cache(args.compile_cache_dir)
    if args.benchmark or args.hotswap:
        path = Path(args.output_dir) / "benchmark.json"
        path.write_text(json.dumps(results, indent=2))
        logger.info("Timings in %s", path)
    return results


if __name__ == "__main__":
    args = parse_args()
    setup_logging(args.debug)
    run_main(main, args, memory_fix="Use less: --quantize nf4 --quantize_t5 --free_text_encoders (for 16-24 GB "
             "cards), --cpu_offload, or a smaller --height/--width.")

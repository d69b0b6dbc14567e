#!/usr/bin/env python
"""QLoRA fine-tuning of FLUX.1-dev: NF4 base (bitsandbytes) + LoRA (peft) + 8-bit AdamW, on cached embeddings.

    accelerate launch --config_file accelerate.yaml train_qlora_flux.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --data_df_path embeddings.parquet --instance_data_dir my_images \\
        --width 512 --height 768 --rank 4 --use_8bit_adam --gradient_checkpointing --cache_latents \\
        --max_train_steps 700 --checkpointing_steps 100 --output_dir my-flux-lora

The text embeddings come from compute_embeddings.py (the text encoders are never loaded here); the images are
read with the same dataset flags and matched to their embeddings by the hash of their pixels. The output is
`pytorch_lora_weights.safetensors`, which `FluxPipeline.load_lora_weights` reads.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import AutocastKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from flux_qlora import flow
from flux_qlora.batches import Augment, Batch, SampleOrder, TrainData, draw_batch, held_out_rows, load_buckets
from flux_qlora.buckets import check_size_flags, histogram
from flux_qlora.checkpoints import (
    StopSignals,
    check_loss_finite,
    check_resume_target,
    prepare_output_dir,
    register_lora_checkpoint_hooks,
    resume,
    save_checkpoint,
)
from flux_qlora.cli import (
    add_base_precision_args,
    add_config_arg,
    add_dataset_args,
    add_flow_matching_args,
    add_image_args,
    add_lora_args,
    add_model_args,
    add_optimisation_args,
    add_output_args,
    check_dataset_args,
    check_flag_combinations,
    check_ranges,
    class_samples,
    dataset_kwargs,
    eval_samples,
    hub_kwargs,
    parse_args_with_config,
    run_main,
    run_versions,
    scrub_secret_flags,
    setup_logging,
    sizes_text,
    timestep_sampling,
    training_shape,
    training_sizes,
    warn_about_pitfalls,
    write_config,
)
from flux_qlora.compile_cache import load_compile_cache, save_compile_cache, start_compile_workers
from flux_qlora.convert import COMFYUI_WEIGHT_NAME, convert_file
from flux_qlora.data import load_samples
from flux_qlora.embeddings import check_embeddings_fit, match_embeddings, read_embeddings
from flux_qlora.errors import UserError
from flux_qlora.evaluation import eval_loss
from flux_qlora.hardware import Device, check_bf16, check_fp8_device, pick_attention_backend
from flux_qlora.latent_cache import LatentCache, vae_fingerprint
from flux_qlora.lora import EMA_WEIGHT_NAME, add_lora, check_rank, lora_parameters, save_lora, target_modules
from flux_qlora.memory import MemoryPlan, check_fits, plan_training
from flux_qlora.models import (
    DTYPES,
    base_precision_label,
    compile_blocks,
    count_nf4_layers,
    enable_fp8_training,
    load_transformer,
    load_vae,
    read_transformer_config,
    route_block_calls,
    set_attention_backend,
)
from flux_qlora.reports import (
    ModelCard,
    RunStats,
    StepClock,
    StepProfiler,
    allocated_gib,
    launch_seconds,
    log_run_start,
    peak_memory_gib,
    plot_loss,
    push_to_hub,
    write_summary,
)
from flux_qlora.step import (
    FlatLora,
    LoraEma,
    NoEma,
    check_cuda_graphs,
    in_cuda_graph,
    lora_compute_dtype,
    make_optimizer,
    offload_activations,
)
from flux_qlora.validation import SampleSettings, sample_images, validation_embeddings

logger = get_logger("train_qlora_flux")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of this script (docs/flags.md is generated from it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--pretrained_transformer_model_name_or_path", type=str, default=None,
                        help="Train this transformer instead of the pipeline's (Hub id or folder; e.g. a de-distilled "
                             "one, or a pre-quantized NF4 checkpoint). The VAE still comes from the pipeline.")
    add_dataset_args(parser)
    parser.add_argument("--data_df_path", type=str, required=True, help="The parquet of compute_embeddings.py.")
    parser.add_argument("--output_dir", type=str, default="flux-qlora-output", help="LoRA, checkpoints, samples, logs.")
    add_image_args(parser)
    add_base_precision_args(parser)
    add_lora_args(parser)
    add_optimisation_args(parser)
    add_flow_matching_args(parser)
    add_output_args(parser)
    add_config_arg(parser)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    return parse_args_with_config(build_parser(), input_args)


def validate_args(args: argparse.Namespace) -> None:
    """Every cross-flag check, before anything heavy loads."""
    check_dataset_args(args)
    # Resolved here: the size of the validation images (with buckets: square, at the first resolution).
    args.width, args.height = check_size_flags(args.resolution, args.bucket_step, args.width, args.height)
    args.cache_latents = args.cache_latents or bool(args.cache_latents_dir)
    check_ranges(args)
    warn_about_pitfalls(args)
    timestep_sampling(args)
    check_flag_combinations(args)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to, project_config=project,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cuda" and \
            Device.of(accelerator.device).has_bf16:
        logger.warning("fp16 on a GPU that supports bf16: bf16 is safer (fp16 overflows skip steps).")
    return accelerator


def check_hardware(args: argparse.Namespace, accelerator: Accelerator, weight_dtype: torch.dtype,
                   config: dict) -> str | None:
    """What this device can't run is refused here, before anything loads; returns the attention backend."""
    device = Device.of(accelerator.device)
    if args.do_fp8_training:
        check_fp8_training(args.base_precision, device, weight_dtype)
    if args.cuda_graphs:
        processes = accelerator.num_processes
        check_cuda_graphs(accelerator.device, processes, lora_compute_dtype(processes, weight_dtype))
    return pick_attention_backend(args.attention_backend, device, weight_dtype, config["attention_head_dim"])


def check_fp8_training(base_precision: str, device: Device, weight_dtype: torch.dtype) -> None:
    """--do_fp8_training needs FP8 tensor cores (compute capability 8.9+). On the NF4 base the FP8 products compute
    from bf16 and write bf16, and torch runs them on the CPU too (slowly: what the tests run)."""
    from flux_qlora.nf4 import cpu_fp8_gemm_runs  # imports bitsandbytes

    if base_precision == "nf4" and weight_dtype != torch.bfloat16:
        raise UserError("--do_fp8_training on the NF4 base computes from bf16: add --mixed_precision bf16.")
    if not (base_precision == "nf4" and device.type == "cpu"):
        check_fp8_device(device, "--do_fp8_training")
    elif not cpu_fp8_gemm_runs():
        raise UserError(f"--do_fp8_training on the CPU needs torch's row-wise scaled FP8 products (torch 2.13, as "
                        f"requirements.txt pins; this is torch {torch.__version__}): install it or drop the flag.")


def plan_memory(args: argparse.Namespace, accelerator: Accelerator, weight_dtype: torch.dtype,
                config: dict) -> MemoryPlan:
    """Predicts the run's peak GPU memory and system RAM; stops with the flags that would fit if the GPU is too
    small."""
    largest = max((size for sizes in training_sizes(args) for size in sizes), key=lambda s: s[0] * s[1])
    shape = training_shape(args, largest, weight_dtype.itemsize)  # the largest bucket sets the peak
    plan = plan_training(config, shape)
    device = Device.of(accelerator.device)
    logger.info("Memory plan: %s, on %s%s", plan.describe(), device.describe(),
                f" ({device.memory_gib:.1f} GiB)" if device.memory_gib else "")
    check_fits(config, shape, plan, device)
    return plan


def load_train_data(args: argparse.Namespace, accelerator: Accelerator, weight_dtype: torch.dtype, config: dict,
                    startup: dict[str, float]):
    """Images + their embeddings, matched by image hash; latents cached (VAE then moved to the CPU) with
    --cache_latents. Returns (data, vae)."""
    samples = load_samples(**dataset_kwargs(args))
    table = read_embeddings(args.data_df_path)
    check_embeddings_fit(table, config, args.data_df_path)
    embeddings = match_embeddings(samples, table, args.data_df_path)
    validation = validation_embeddings(table, args.validation_prompt, args.pretrained_model_name_or_path,
                                       accelerator.device, **hub_kwargs(args))
    held_out = held_out_rows(samples, args.validation_split)
    train_rows = sorted(set(range(len(samples))) - set(held_out))
    buckets = load_buckets(samples, training_sizes(args), check_size=bool(args.resolution),
                           alpha_mask=args.alpha_mask, rows=train_rows)
    empty_caption = table.prompt("") if args.caption_dropout else None
    augment = Augment(args.crop, args.random_flip, args.seed)
    data = TrainData.build(embeddings, buckets, validation, weight_dtype, augment, empty_caption)
    startup["images_indexed"] = launch_seconds(accelerator.device)  # apart from the VAE: which one is slow
    vae = load_vae(args.pretrained_model_name_or_path, accelerator.device, weight_dtype, **hub_kwargs(args))
    startup["vae_loaded"] = launch_seconds(accelerator.device)
    data.held_out = load_held_out_data(args, samples, held_out, embeddings, table, weight_dtype)
    if data.held_out:  # center crops, latents encoded now: the same inputs at every evaluation
        data.held_out.cache_latents(vae, show_progress=False)
        logger.info("%d image(s) held out for the eval loss", data.held_out.num_items)
    data.prior = load_prior_data(args, table, weight_dtype)
    if args.cache_latents:
        fingerprint = vae_fingerprint(args.pretrained_model_name_or_path, args.revision, args.variant)
        cache = LatentCache(args.cache_latents_dir, fingerprint, weight_dtype) if args.cache_latents_dir else None
        for part in [data] + ([data.prior] if data.prior else []):
            encoded = part.cache_latents(vae, show_progress=accelerator.is_local_main_process, cache=cache)
            if cache:
                logger.info("Latents in %s: %d encoded, %d reused", cache.folder, encoded, part.num_items - encoded)
        vae.to("cpu")  # only needed again to decode sample images
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logger.info("%d images, %d items in %d bucket(s): %s; embeddings of %d tokens%s", len(data), data.num_items,
                len(buckets), histogram([b.size for b in buckets for _ in range(len(b))]),
                data.prompt_embeds.shape[1], ", latents cached" if args.cache_latents else "")
    return data, vae


def load_held_out_data(args: argparse.Namespace, samples: list, held_out: list[int], embeddings, table,
                       weight_dtype: torch.dtype) -> TrainData | None:
    """The eval loss's images: `held_out` rows of the training set (--validation_split) or the images of
    --eval_data_dir, which must not be training images too; None without either."""
    if args.eval_data_dir:
        held_out_samples = eval_samples(args)
        trained = {s.image_hash for s in samples}
        both = [s.source for s in held_out_samples if s.image_hash in trained]
        if both:
            raise UserError(f"{len(both)} image(s) of --eval_data_dir are also training images (e.g. {both[0]}): "
                            "held-out images must not be trained on; remove them from one of the folders.")
        embeddings = match_embeddings(held_out_samples, table, args.data_df_path,
                                      f"run compute_embeddings.py with --eval_data_dir {args.eval_data_dir}")
        samples, held_out = held_out_samples, list(range(len(held_out_samples)))
    if not held_out:
        return None
    buckets = load_buckets(samples, training_sizes(args), bool(args.resolution), args.alpha_mask, held_out)
    return TrainData.build(embeddings, buckets, {}, weight_dtype, Augment(seed=args.seed))


def load_prior_data(args: argparse.Namespace, table, weight_dtype: torch.dtype) -> TrainData | None:
    """The regularisation images of --class_data_dir with their embeddings (none without the flag)."""
    samples = class_samples(args)
    if not samples:
        return None
    embeddings = match_embeddings(samples, table, args.data_df_path,
                                  f"run compute_embeddings.py with --class_data_dir {args.class_data_dir}")
    buckets = load_buckets(samples, training_sizes(args), bool(args.resolution), args.alpha_mask)
    logger.info("%d regularisation images from %s, prior loss weight %g", len(samples), args.class_data_dir,
                args.prior_loss_weight)
    return TrainData.build(embeddings, buckets, {}, weight_dtype, Augment(args.crop, args.random_flip, args.seed + 1))


def make_sample_order(args: argparse.Namespace, accelerator: Accelerator, data: TrainData) -> SampleOrder:
    order = SampleOrder([len(b) for b in data.buckets], args.repeats, args.train_batch_size,
                        accelerator.num_processes, args.seed)
    if order.micro_steps_per_epoch == 0:
        raise UserError(f"{data.num_items} images x {args.repeats} repeats is less than one global batch "
                        f"({order.global_batch}) in every bucket; lower --train_batch_size or raise --repeats.")
    small = [f"{w}x{h}" for b in data.buckets if len(b) * args.repeats < order.global_batch for w, h in [b.size]]
    if small:
        logger.warning("bucket(s) %s hold fewer items than one batch of %d: their images are left out; lower "
                       "--train_batch_size or raise --repeats.", ", ".join(small), order.global_batch)
    return order


def load_transformer_with_lora(args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype,
                               attention_backend: str | None):
    transformer = load_transformer(args.pretrained_transformer_model_name_or_path or args.pretrained_model_name_or_path,
                                   device, weight_dtype, nf4=args.base_precision == "nf4", **hub_kwargs(args))
    # Like peft's prepare_model_for_kbit_training, minus its up-cast of every non-quantized weight to fp32
    # (~1 GB on Flux, no quality gain measured by others): only the LoRA weights are trained, in fp32.
    set_seed(args.seed)
    add_lora(transformer, args.rank, args.lora_alpha, args.init_lora_weights, target_modules(args.lora_layers))
    if args.do_fp8_training and args.base_precision == "bf16":  # the NF4 base's FP8 is compiled in: compile_blocks
        enable_fp8_training(transformer)
    set_attention_backend(transformer, attention_backend, training=True)
    if args.compile:
        # A process-wide switch, set here where --compile is handled: AOTAutograd's common-subexpression
        # elimination merged the backward's NF4 dequantization with the forward's and then kept every block's bf16
        # weights for the backward (+21 GiB on FLUX.1-dev at 512x768, measured).
        torch._functorch.config.cse = False
        # Also process-wide: each bucket size is a graph of its own (dynamic=False), and so is each size in no_grad
        # (eval loss, sample images); past dynamo's limit of 8 per block a block would silently run eagerly.
        sizes = sum(len(s) for s in training_sizes(args))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 3 * sizes + 8)
        load_compile_cache(args.compile_cache_dir)
        compile_blocks(transformer, fp8=args.do_fp8_training)
    if args.gradient_checkpointing or args.compile:
        route_block_calls(transformer, args.gradient_checkpointing_interval if args.gradient_checkpointing else 0,
                          compiled=args.compile)
    transformer.train()
    trainable = sum(p.numel() for p in lora_parameters(transformer))
    logger.info("LoRA rank %d on %s: %.2fM trainable parameters; %d NF4 layers", args.rank, args.lora_layers,
                trainable / 1e6, count_nf4_layers(transformer))
    return transformer


@dataclass
class Run:
    """What the training loop works on, set up once by main()."""

    accelerator: Accelerator
    transformer: torch.nn.Module  # NF4 base + LoRA, wrapped by accelerate (DDP on several processes)
    flat_lora: FlatLora  # the LoRA weights as the optimizer sees them
    ema: LoraEma | NoEma  # their moving average (--use_ema), updated after each optimizer step
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    data: TrainData
    order: SampleOrder
    vae: torch.nn.Module  # on the CPU between sample images when latents are cached
    prior_order: SampleOrder | None = None  # --class_data_dir's, repeated so that each bucket fills a batch

    def datasets(self) -> list[tuple[TrainData, SampleOrder]]:
        """What each micro step draws a batch from: the training images, then the regularisation images."""
        return [(self.data, self.order)] + ([(self.data.prior, self.prior_order)] if self.data.prior else [])


def make_micro_step(args: argparse.Namespace, run: Run) -> Callable[..., torch.Tensor]:
    """Forward, backward and (with a compute copy) the fp32 gradient gather: GPU work only, so with --cuda_graphs
    it is captured once and replayed. Its inputs are `draw_batch`'s tensors for each of `run.datasets()`; the
    loss is the training images' plus --prior_loss_weight times the regularisation images'."""
    accelerator, transformer = run.accelerator, run.transformer
    device, dtype = accelerator.device, run.data.prompt_embeds.dtype
    image_ids = {}  # per latent size (one per bucket): made eagerly, so a CUDA graph keeps its address
    text_ids = run.data.text_ids.to(device)
    guidance_embeds = accelerator.unwrap_model(transformer).config.guidance_embeds  # DDP hides .config
    guidance = args.guidance_scale if guidance_embeds else None
    offload = offload_activations(transformer, device, args.offload_activations)
    # Inside a CUDA graph autocast must not cache casts across calls (the cache would outlive the capture).
    autocast = AutocastKwargs(cache_enabled=False) if args.cuda_graphs else None

    widths = [5 + data.has_masks for data, _ in run.datasets()]  # how many of the inputs each batch has
    weights = [1.0, args.prior_loss_weight][: len(widths)]

    def micro_step(*inputs: torch.Tensor) -> torch.Tensor:
        loss, start = 0, 0
        with accelerator.autocast(autocast), offload:
            for width, weight in zip(widths, weights):
                latents, prompt_embeds, pooled_prompt_embeds, noise, sigmas, *mask = inputs[start : start + width]
                start += width
                size = tuple(latents.shape[-2:])
                if size not in image_ids:
                    image_ids[size] = flow.latent_image_ids(*size, device=device, dtype=dtype)
                batch = Batch(latents, prompt_embeds, pooled_prompt_embeds, *mask)
                loss = loss + weight * flow.flow_matching_step(transformer, batch, noise, sigmas, text_ids,
                                                               image_ids[size], guidance, args.weighting_scheme)
        accelerator.backward(loss)
        run.flat_lora.after_backward()
        return loss.detach()

    return in_cuda_graph(micro_step, args.cuda_graphs)


def first_step_done(args: argparse.Namespace, stats: RunStats, device: torch.device, main_process: bool) -> None:
    """Start-up is over: how long it took, and (--compile_cache_dir) the graphs compiled for it kept for next time."""
    stats.startup["first_step"] = launch_seconds(device)
    logger.info("First optimizer step done %.0f s after launch (data loaded at %.0f s, model at %.0f s)",
                stats.startup["first_step"], stats.startup["data_loaded"], stats.startup["model_loaded"])
    if main_process:
        save_compile_cache(args.compile_cache_dir)


def optimizer_step(run: Run, max_grad_norm: float) -> bool:
    """One step of the fp32 master weights (clipped), then the compute copy follows and the LR moves on. Returns
    whether fp16 loss scaling skipped the step (inf/NaN gradients: the scale is lowered and the weights kept)."""
    run.flat_lora.before_optimizer_step()
    if max_grad_norm > 0:
        run.accelerator.clip_grad_norm_([run.flat_lora.master], max_grad_norm)
    run.optimizer.step()
    run.ema.update()
    run.flat_lora.sync()
    run.flat_lora.zero_grad()
    run.lr_scheduler.step()
    return run.optimizer.step_was_skipped


def train(args: argparse.Namespace, run: Run, stats: RunStats) -> None:
    """The loop, from step `stats.start_step`: micro steps under accumulate(), an optimizer step every
    --gradient_accumulation_steps; each step's loss and time go into `stats`."""
    accelerator, accumulation, device = run.accelerator, args.gradient_accumulation_steps, run.accelerator.device
    micro_step = make_micro_step(args, run)
    sampling = timestep_sampling(args)
    # The memory snapshot only with --compile: recording the allocations crashed the eager NF4 steps (bitsandbytes'
    # own layers; fp32 and bf16, segfault or "SystemError: error return without exception set" on the H200).
    profiler = StepProfiler(args.profile_dir, device, record_memory=args.compile)
    progress = tqdm(total=args.max_train_steps, initial=stats.start_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    step, clock, pending, signals = stats.start_step, StepClock(), [], StopSignals(accelerator.num_processes)
    try:  # the bar ends its line before any message below it
        for micro_index in range(stats.start_step * accumulation, args.max_train_steps * accumulation):
            inputs = [tensor for i, (data, order) in enumerate(run.datasets())  # no caption dropout on the prior
                      for tensor in draw_batch(data, order, micro_index, accelerator.process_index, run.vae, device,
                                               sampling, caption_dropout=args.caption_dropout * (i == 0))]
            with accelerator.accumulate(run.transformer), stats.compiles.micro_step(tuple(inputs[0].shape)):
                loss = micro_step(*inputs)
                if accelerator.sync_gradients:
                    stats.skipped_steps += optimizer_step(run, args.max_grad_norm)
            pending.append(loss.clone())  # a CUDA graph's output is overwritten by its next replay
            if not accelerator.sync_gradients:
                continue
            step += 1
            elapsed = clock.lap()
            if step == stats.start_step + 1:
                first_step_done(args, stats, device, accelerator.is_main_process)
            if not profiler.profiling(step):  # the profiler's own overhead stays out of the timing
                stats.step_times.append(elapsed)
            stop = False  # Ctrl-C / SIGTERM: a checkpoint at this step, then stop (agreed by all processes)
            # Also before a checkpoint, so the losses it stores are complete.
            if (step % args.logging_steps == 0 or step == args.max_train_steps or step % args.checkpointing_steps == 0
                    or signals.forces_sync()):
                # The one host sync per logging interval: the interval's losses come back together, with whether
                # any process got a stop signal (one collective: a second one per step hung loaded DDP runs).
                interval = torch.stack(pending).float().view(-1, accumulation).mean(1)
                *interval, anyone = accelerator.reduce(signals.with_flag(interval).to(device), "mean").tolist()
                stop = anyone > 0 and step < args.max_train_steps
                check_loss_finite(interval, step, args.output_dir)  # before anything of this step is saved
                stats.losses.extend(interval)
                pending = []
                logs = {"loss": interval[-1], "lr": run.lr_scheduler.get_last_lr()[0], "s_per_step": elapsed,
                        "peak_memory_gib": peak_memory_gib(device)}
                accelerator.log(logs, step=step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", s_step=f"{elapsed:.2f}")
            progress.update(1)
            profiler.after_step(step)
            if (step % args.checkpointing_steps == 0 or stop) and step < args.max_train_steps:
                path = save_checkpoint(accelerator, args.output_dir, step,
                                       {"losses": stats.losses, "eval_losses": stats.eval_losses},
                                       args.checkpoints_total_limit)
                logger.info("Saved checkpoint %s", path)
                if stop:
                    signals.stop_here(step, path)
            if args.validation_steps and step % args.validation_steps == 0 and step < args.max_train_steps:
                generate_samples(args, run, step)
            if step % args.eval_steps == 0 or step == args.max_train_steps:
                evaluate(args, run, stats, step)
    finally:
        progress.close()
        profiler.close(step)
        signals.restore()
    stats.kernel_s_per_step = profiler.kernel_s_per_step
    stats.cuda_graphs_captured = len(getattr(micro_step, "graphs", ()))
    if stats.skipped_steps:
        logger.warning("%d optimizer step(s) skipped: fp16 gradients overflowed (inf/NaN) and the loss scale was "
                       "lowered. Many skips: use bf16 if the GPU has it, or lower --learning_rate.",
                       stats.skipped_steps)


@torch.no_grad()
def generate_samples(args: argparse.Namespace, run: Run, step: int) -> list[str]:
    """Validation images of --validation_prompt (none without, and none on the other processes)."""
    if not args.validation_prompt or not run.accelerator.is_main_process:
        return []
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir)
    settings = SampleSettings(run.data.validation, args.width, args.height, args.validation_inference_steps,
                              args.validation_guidance_scale, args.seed)
    with run.ema.weights() if args.validate_ema else nullcontext():
        return sample_images(run.accelerator, run.transformer, run.vae, scheduler, settings, Path(args.output_dir),
                             step, vae_home="cpu" if args.cache_latents else run.accelerator.device)


def evaluate(args: argparse.Namespace, run: Run, stats: RunStats, step: int) -> None:
    """The held-out eval loss (nothing without --validation_split), on the main process."""
    if run.data.held_out is None or not run.accelerator.is_main_process:
        return
    model = run.accelerator.unwrap_model(run.transformer)  # no DDP hooks: the other processes don't take part
    guidance = args.guidance_scale if model.config.guidance_embeds else None
    loss = eval_loss(model, run.data.held_out, guidance, args.weighting_scheme, run.accelerator.autocast, args.seed)
    stats.eval_losses.append([step, loss])
    run.accelerator.log({"eval_loss": loss}, step=step)


def finish(args: argparse.Namespace, run: Run, stats: RunStats, samples_before: list[str]) -> dict:
    """Saves the LoRA, the loss plot, after-samples, the run summary and the model card; pushes to the Hub if
    asked. Returns the summary (on the main process; {} on the others)."""
    accelerator, output_dir = run.accelerator, Path(args.output_dir)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(run.transformer)
    summary = {}
    if accelerator.is_main_process:
        with run.flat_lora.master_weights():
            lora_path = save_lora(model, output_dir, fold_alpha=True)
        logger.info("Saved the LoRA to %s", lora_path)
        if args.use_ema:
            with run.ema.weights():
                logger.info("Saved the EMA LoRA to %s", save_lora(model, output_dir, EMA_WEIGHT_NAME, fold_alpha=True))
        if args.export_format:  # the same LoRA in the kohya/ComfyUI layout
            logger.info("Saved the %s LoRA to %s", args.export_format,
                        convert_file(lora_path, output_dir / COMFYUI_WEIGHT_NAME, "comfyui"))
    samples_after = generate_samples(args, run, args.max_train_steps)
    if accelerator.is_main_process:
        save_compile_cache(args.compile_cache_dir)  # graphs compiled after the first step (other buckets)
        if stats.losses:
            plot_loss(stats.losses, output_dir / "loss.png", stats.eval_losses)
        summary = {
            "steps": args.max_train_steps, **stats.summary(accelerator.device), "lora": str(lora_path),
            "loss_plot": str(output_dir / "loss.png"), "samples_before": samples_before,
            "samples_after": samples_after, "num_processes": accelerator.num_processes,
            "nf4_layers": count_nf4_layers(model), "losses": stats.losses,
        }
        write_summary(output_dir / "train_summary.json", summary)
        logger.info("Run summary (%s): %s", output_dir / "train_summary.json",
                    {k: v for k, v in summary.items() if k != "losses"})
        repo_name = args.hub_model_id or output_dir.name
        card = ModelCard(
            base_model=args.pretrained_model_name_or_path, repo_id=args.hub_model_id or args.output_dir,
            title=repo_name, rank=args.rank, alpha=args.lora_alpha or args.rank, layers=args.lora_layers,
            steps=args.max_train_steps, base_precision=base_precision_label(args.base_precision, args.do_fp8_training),
            sizes=sizes_text(args), instance_prompt=args.instance_prompt, validation_prompts=args.validation_prompt,
            sample_files=samples_after, comfyui_file=args.export_format and COMFYUI_WEIGHT_NAME)
        (output_dir / "README.md").write_text(card.render())
        if args.push_to_hub:  # everything is on disk already: a failed upload is one line and the retry command
            push_to_hub(args.output_dir, repo_name, args.hub_token)
    return summary


def end_processes(run: Run) -> None:
    """Ends the trackers and, with several processes, their group, avoiding a hang in torch's gloo teardown
    (pytorch#56297; reproduced: about one resumed 2-process CPU run in 15 hung at exit on a loaded machine). DDP's
    reducer, freed with the GIL held, was the group's last owner and joined its worker threads while one of them
    waited for the GIL to free the last collective's tensors. So the group is held here until the DDP wrapper is
    gone, and then freed through torch's own binding, which releases the GIL first."""
    if not torch.distributed.is_initialized():  # one process: no group
        run.accelerator.end_training()
        return
    group = torch.distributed.group.WORLD
    run.transformer = run.accelerator.unwrap_model(run.transformer)
    run.accelerator.free_memory()  # the accelerator's references to the wrapper
    gc.collect()  # DDP's hooks make reference cycles (each collection ~0.3 s, so only here)
    run.accelerator.end_training()
    del group


def main(args: argparse.Namespace) -> dict:
    startup = {"main_started": launch_seconds(torch.device("cpu"))}  # after Python and the top imports
    validate_args(args)
    check_bf16("--mixed_precision", args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
               Device.for_launch())
    accelerator = make_accelerator(args)
    weight_dtype = DTYPES[accelerator.mixed_precision]
    config = read_transformer_config(args.pretrained_transformer_model_name_or_path
                                     or args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    attention_backend = check_hardware(args, accelerator, weight_dtype, config)
    check_rank(args.rank, config)
    plan = plan_memory(args, accelerator, weight_dtype, config)
    if args.dry_run:
        print(f"Memory plan: {plan.describe()}")
        return {"memory_plan": asdict(plan) | {"peak_gib": plan.peak_gib}}
    if args.compile:
        start_compile_workers(accelerator.device)  # ready by the first step, instead of starting then
    if accelerator.is_main_process:  # writable, room for a checkpoint, never mixed with another run
        prepare_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir,
                           int(plan.lora_gib * 2**30) + 2**20)

    data, vae = load_train_data(args, accelerator, weight_dtype, config, startup)
    startup["data_loaded"] = launch_seconds(accelerator.device)
    order = make_sample_order(args, accelerator, data)
    if args.max_train_steps is None:
        args.max_train_steps = math.ceil(args.num_train_epochs * order.micro_steps_per_epoch
                                         / args.gradient_accumulation_steps)
    check_resume_target(args.resume_from_checkpoint, args.output_dir, args.max_train_steps)
    if accelerator.is_main_process:  # the effective flags: --config of this file runs the same training again
        write_config(args, Path(args.output_dir) / "training_config.toml", run_versions(),
                     leave_out={"width", "height"} if args.resolution else set())

    transformer = load_transformer_with_lora(args, accelerator.device, weight_dtype, attention_backend)
    model_gib, startup["model_loaded"] = allocated_gib(accelerator.device), launch_seconds(accelerator.device)
    transformer = accelerator.prepare(transformer)
    # Flattened after DDP wraps the model: flattening before made a 2-process run drift from the 1-process one.
    flat_lora = FlatLora(lora_parameters(transformer), lora_compute_dtype(accelerator.num_processes, weight_dtype))
    optimizer = accelerator.prepare(make_optimizer([flat_lora.master], args.use_8bit_adam, lr=args.learning_rate,
                                                   betas=(args.adam_beta1, args.adam_beta2),
                                                   weight_decay=args.adam_weight_decay, eps=args.adam_epsilon))
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    accelerator.register_for_checkpointing(lr_scheduler)
    register_lora_checkpoint_hooks(accelerator, flat_lora)
    ema = LoraEma(flat_lora, args.ema_decay) if args.use_ema else NoEma()
    if args.use_ema:
        accelerator.register_for_checkpointing(ema)
    prior_order = data.prior and SampleOrder([len(b) for b in data.prior.buckets], order.global_batch,
                                             args.train_batch_size, accelerator.num_processes, args.seed + 1)
    run = Run(accelerator, transformer, flat_lora, ema, optimizer, lr_scheduler, data, order, vae, prior_order)
    del transformer  # held by `run` alone, which end_processes() unwraps

    resumed = resume(accelerator, args.resume_from_checkpoint, args.output_dir)
    stats = RunStats(resumed.get("global_step", 0), list(resumed.get("losses", [])), model_gib=model_gib,
                     predicted_peak_gib=plan.peak_gib, eval_losses=list(resumed.get("eval_losses", [])),
                     startup=startup)
    log_run_start(args, accelerator, len(data), order, stats.start_step)
    samples_before = generate_samples(args, run, 0) if stats.start_step == 0 else []
    try:
        if stats.start_step == 0:
            evaluate(args, run, stats, 0)
        train(args, run, stats)
        return finish(args, run, stats, samples_before)
    finally:
        end_processes(run)


if __name__ == "__main__":
    args = parse_args()
    scrub_secret_flags(sys.argv)
    setup_logging(args.debug)
    logging.getLogger("train_qlora_flux").setLevel(logging.INFO)
    run_main(main, args, memory_fix="Use less: --gradient_checkpointing, --offload_activations, a smaller "
             "--resolution, --train_batch_size 1 (--dry_run prints the memory plan); checkpoints already written "
             "resume with --resume_from_checkpoint latest.")

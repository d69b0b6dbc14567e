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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import AutocastKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from flux_qlora import (
    blocks,
    checkpoints,
    cli,
    compile_cache,
    embeddings,
    families,
    flow,
    lora,
    memory,
    models,
    reports,
    run_config,
    step,
    train_settings,
    validation,
)
from flux_qlora.batches import Augment, ImageSet, SampleOrder, StepInputs, TrainData, held_out_rows, load_buckets
from flux_qlora.buckets import histogram
from flux_qlora.convert import COMFYUI_WEIGHT_NAME, convert_file
from flux_qlora.data import load_samples
from flux_qlora.errors import UserError
from flux_qlora.evaluation import eval_loss
from flux_qlora.families import Family
from flux_qlora.hardware import Device, check_bf16, check_fp8_training, pick_attention_backend
from flux_qlora.latent_cache import LatentCache, vae_fingerprint
from flux_qlora.reports import RunStats, Startup, launch_seconds
from flux_qlora.train_settings import TrainSettings

logger = get_logger("train_qlora_flux")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of this script (docs/flags.md is generated from it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    parser.add_argument("--pretrained_transformer_model_name_or_path", type=str, default=None,
                        help="Train this transformer instead of the pipeline's (Hub id or folder; e.g. a de-distilled "
                             "one, or a pre-quantized NF4 checkpoint). The VAE still comes from the pipeline.")
    cli.add_dataset_args(parser)
    parser.add_argument("--data_df_path", type=str, required=True, help="The parquet of compute_embeddings.py.")
    parser.add_argument("--output_dir", type=str, default="flux-qlora-output", help="LoRA, checkpoints, samples, logs.")
    train_settings.add_image_args(parser)
    train_settings.add_base_precision_args(parser)
    train_settings.add_lora_args(parser)
    train_settings.add_optimisation_args(parser)
    train_settings.add_flow_matching_args(parser)
    train_settings.add_output_args(parser)
    cli.add_config_arg(parser)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    return cli.parse_args_with_config(build_parser(), input_args)


def flag_defaults() -> dict:
    """Every flag's default, as this version of the script has it."""
    return {action.dest: action.default for action in build_parser()._actions}


def validate_args(args: argparse.Namespace) -> TrainSettings:
    """Every check of the flags, before anything heavy loads; the settings derived from them, resolved once."""
    return train_settings.resolve(args)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to, project_config=project,
    )
    if (accelerator.mixed_precision == "fp16" and accelerator.device.type == "cuda"
            and Device.of(accelerator.device).has_bf16):
        logger.warning("fp16 on a GPU that supports bf16: bf16 is safer (fp16 overflows skip steps).")
    return accelerator


def check_hardware(args: argparse.Namespace, settings: TrainSettings, accelerator: Accelerator,
                   weight_dtype: torch.dtype, config: dict) -> str | None:
    """What this device can't run is refused here, before anything loads; returns the attention backend."""
    device = Device.of(accelerator.device)
    if args.do_fp8_training:
        check_fp8_training(args.base_precision, device, weight_dtype)
    if args.cuda_graphs:
        processes = accelerator.num_processes
        step.check_cuda_graphs(accelerator.device, processes, step.lora_compute_dtype(processes, weight_dtype))
    return pick_attention_backend(args.attention_backend, device, weight_dtype, config["attention_head_dim"],
                                  prefer_cudnn=settings.family.prefer_cudnn_attention)


def plan_memory(args: argparse.Namespace, settings: TrainSettings, accelerator: Accelerator,
                weight_dtype: torch.dtype, config: dict) -> memory.MemoryPlan:
    """Predicts the run's peak GPU memory and system RAM; stops with the flags that would fit if the GPU is too
    small."""
    rows, text_tokens = embeddings.rows_and_text_tokens(args.data_df_path)
    shape = train_settings.training_shape(args, settings, text_tokens, rows, weight_dtype.itemsize)
    plan = memory.plan_training(config, shape)
    device = Device.of(accelerator.device)
    logger.info("Memory plan: %s, on %s%s", plan.describe(), device.describe(),
                f" ({device.memory_gib:.1f} GiB)" if device.memory_gib else "")
    memory.check_fits(config, shape, plan, device)
    return plan


class Images(NamedTuple):  # the run's image sets, their latents not yet cached
    train: TrainData
    held_out: TrainData | None  # the eval loss's (--validation_split, --eval_data_dir)
    prior: TrainData | None  # the regularisation images (--class_data_dir)


def load_images(args: argparse.Namespace, settings: TrainSettings, table: embeddings.TextEmbeddings,
                weight_dtype: torch.dtype) -> Images:
    """The training images and, where the flags ask for them, the held-out and regularisation images, each matched
    to its embeddings by image hash and loaded at its bucket of each training size."""
    samples = load_samples(**cli.dataset_kwargs(args))
    held_out = held_out_rows(samples, args.validation_split)
    train_rows = sorted(set(range(len(samples))) - set(held_out))
    empty_caption = table.prompt("") if args.caption_dropout else None
    train = load_image_set(args, settings, samples, table, weight_dtype, Augment(args.crop, args.random_flip,
                                                                                 args.seed), train_rows, empty_caption,
                           what="training images", alpha_required=args.alpha_mask)
    if args.eval_data_dir:
        samples = cli.eval_samples(args, trained=samples)
        held_out = list(range(len(samples)))
    held_out_data = held_out and load_image_set(  # center crops: the same inputs at every evaluation
        args, settings, samples, table, weight_dtype, Augment(seed=args.seed, stream="held-out"), held_out,
        rerun=args.eval_data_dir and f"run compute_embeddings.py with --eval_data_dir {args.eval_data_dir}",
        what="held-out images")
    prior_samples = cli.class_samples(args)
    prior = prior_samples and load_image_set(
        args, settings, prior_samples, table, weight_dtype,
        Augment(args.crop, args.random_flip, args.seed, stream="prior"),
        rerun=f"run compute_embeddings.py with --class_data_dir {args.class_data_dir}",
        what="regularisation images (--class_data_dir)")
    if prior:
        logger.info("%d regularisation images from %s, prior loss weight %g", len(prior_samples),
                    args.class_data_dir, args.prior_loss_weight)
    return Images(train, held_out_data or None, prior or None)


def load_image_set(args: argparse.Namespace, settings: TrainSettings, samples: list,
                   table: embeddings.TextEmbeddings, weight_dtype: torch.dtype, augment: Augment,
                   rows: list[int] | None = None, empty_caption: tuple[torch.Tensor, torch.Tensor] | None = None,
                   rerun: str | None = None, what: str = "images", alpha_required: bool = False) -> TrainData:
    """One recipe for every image set: the embeddings of `samples` (refused with `rerun` where the parquet lacks
    one), the images of `rows` (default all) at their bucket of each training size, their masks checked (`what`:
    the set's name in a message; `alpha_required`: --alpha_mask must find an alpha channel)."""
    matched = embeddings.match_embeddings(samples, table, args.data_df_path, *([rerun] if rerun else []))
    buckets = load_buckets(samples, settings.sizes.lists, settings.sizes.bucketed, args.alpha_mask, rows, what,
                           alpha_required)
    return TrainData.build(matched, buckets, weight_dtype, augment, empty_caption)


def cache_latents(args: argparse.Namespace, settings: TrainSettings, images: Images, vae,
                  accelerator: Accelerator) -> None:
    """The held-out images' latents (always: the same inputs at every evaluation) and, with --cache_latents, the
    training and regularisation images', in memory or in --cache_latents_dir; then the VAE leaves the GPU."""
    if images.held_out:
        images.held_out.cache_latents(vae, show_progress=False)
        logger.info("%d image(s) held out for the eval loss", images.held_out.num_items)
    if settings.latents == "none":
        return
    weight_dtype = images.train.prompt_embeds.dtype
    cache = None
    if settings.latents == "disk":
        fingerprint = vae_fingerprint(args.pretrained_model_name_or_path, args.revision, args.variant)
        cache = LatentCache(args.cache_latents_dir, fingerprint, weight_dtype)
    for data in filter(None, [images.train, images.prior]):
        encoded = data.cache_latents(vae, show_progress=accelerator.is_local_main_process, cache=cache)
        if cache:
            logger.info("Latents in %s: %d encoded, %d reused", cache.folder, encoded, data.num_items - encoded)
    vae.to("cpu")  # only needed again to decode sample images
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_image_sets(args: argparse.Namespace, settings: TrainSettings, accelerator: Accelerator,
                    images: Images) -> list[ImageSet]:
    """What each micro step draws from: the training images, then (--class_data_dir) the regularisation images,
    repeated so that each of their buckets fills a global batch."""
    data, processes = images.train, accelerator.num_processes
    order = SampleOrder([len(b) for b in data.buckets], args.repeats, args.train_batch_size, processes, args.seed)
    if order.micro_steps_per_epoch == 0:
        raise UserError(f"{data.num_items} images x {args.repeats} repeats is less than one global batch "
                        f"({order.global_batch}) in every bucket; lower --train_batch_size or raise --repeats.")
    small = [f"{w}x{h}" for b in data.buckets if len(b) * args.repeats < order.global_batch for w, h in [b.size]]
    if small:
        logger.warning("bucket(s) %s hold fewer items than one batch of %d: their images are left out; lower "
                       "--train_batch_size or raise --repeats.", ", ".join(small), order.global_batch)
    logger.info("%d images, %d items in %d bucket(s): %s; embeddings of %d tokens%s", len(data), data.num_items,
                len(data.buckets), histogram([b.size for b in data.buckets for _ in range(len(b))]),
                data.prompt_embeds.shape[1], "" if settings.latents == "none" else f", latents in {settings.latents}")
    sets = [ImageSet(data, order, caption_dropout=args.caption_dropout)]
    if images.prior:
        prior_order = SampleOrder([len(b) for b in images.prior.buckets], order.global_batch, args.train_batch_size,
                                  processes, args.seed, stream="prior")
        sets.append(ImageSet(images.prior, prior_order, loss_weight=args.prior_loss_weight))
    return sets


def load_transformer_with_lora(args: argparse.Namespace, settings: TrainSettings, device: torch.device,
                               weight_dtype: torch.dtype, attention_backend: str | None):
    transformer = models.load_transformer(
        args.pretrained_transformer_model_name_or_path or args.pretrained_model_name_or_path, device, weight_dtype,
        nf4=args.base_precision == "nf4", **cli.hub_kwargs(args))
    # Like peft's prepare_model_for_kbit_training, minus its up-cast of every non-quantized weight to fp32
    # (~1 GB on Flux, no quality gain measured by others): only the LoRA weights are trained, in fp32.
    transformer.requires_grad_(False)
    set_seed(args.seed)
    targets = list(settings.lora_targets)
    lora.add_lora(transformer, args.rank, args.lora_alpha, args.init_lora_weights, targets)
    if args.do_fp8_training and args.base_precision == "bf16":  # the NF4 base's FP8 is compiled in: compile_blocks
        blocks.enable_fp8_training(transformer)
    blocks.set_attention_backend(transformer, attention_backend, training=True, family=settings.family)
    if args.compile:
        # Per block, one graph per training size, and one per size in no_grad (eval loss, sample images).
        blocks.configure_compile(graphs_per_block=3 * settings.sizes.count + 8)
        compile_cache.load_compile_cache(args.compile_cache_dir)
        blocks.compile_blocks(transformer, fp8=args.do_fp8_training)
    if args.gradient_checkpointing or args.compile:
        blocks.route_block_calls(transformer,
                                 args.gradient_checkpointing_interval if args.gradient_checkpointing else 0,
                                 compiled=args.compile)
    transformer.train()
    trainable = sum(p.numel() for p in lora.lora_parameters(transformer))
    logger.info("LoRA rank %d on %s: %.2fM trainable parameters; %d NF4 layers", args.rank, args.lora_layers,
                trainable / 1e6, models.count_nf4_layers(transformer))
    return transformer


@dataclass
class Run:
    """What the training loop works on, set up once by main()."""

    accelerator: Accelerator
    transformer: torch.nn.Module  # NF4 base + LoRA, wrapped by accelerate (DDP on several processes)
    flat_lora: step.FlatLora  # the LoRA weights as the optimizer sees them
    ema: step.LoraEma | step.NoEma  # their moving average (--use_ema), updated after each optimizer step
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    sets: list[ImageSet]  # what each micro step draws from: the training images, then the regularisation images
    held_out: TrainData | None  # the eval loss's images, latents cached
    validation: validation.SampleSettings | None  # the sample images' prompts and settings (--validation_prompt)
    vae: torch.nn.Module  # on the CPU between sample images when latents are cached
    family: Family  # the model's: its transformer's inputs and positions


def make_micro_step(args: argparse.Namespace, run: Run) -> Callable[..., torch.Tensor]:
    """Forward, backward and (with a compute copy) the fp32 gradient gather: GPU work only, so with --cuda_graphs
    it is captured once and replayed. Its inputs are the flat `StepInputs` of each of `run.sets`; the loss is the
    sum of each set's loss times its weight (--prior_loss_weight for the regularisation images)."""
    accelerator, transformer = run.accelerator, run.transformer
    device, dtype = accelerator.device, run.sets[0].data.prompt_embeds.dtype
    image_ids = {}  # per latent size (one per bucket): made eagerly, so a CUDA graph keeps its address
    text_ids = run.sets[0].data.text_ids.to(device)
    guidance_embeds = accelerator.unwrap_model(transformer).config.guidance_embeds  # DDP hides .config
    guidance = args.guidance_scale if guidance_embeds else None
    offload = step.offload_activations(transformer, device, args.offload_activations)
    # Inside a CUDA graph autocast must not cache casts across calls (the cache would outlive the capture).
    autocast = AutocastKwargs(cache_enabled=False) if args.cuda_graphs else None
    has_masks = [image_set.data.has_masks for image_set in run.sets]

    def micro_step(*flat: torch.Tensor) -> torch.Tensor:
        loss = 0
        with accelerator.autocast(autocast), offload:
            for inputs, image_set in zip(StepInputs.unflatten(flat, has_masks), run.sets):
                size = tuple(inputs.latents.shape[-2:])
                if size not in image_ids:
                    image_ids[size] = run.family.image_ids(*size, device=device, dtype=dtype)
                loss = loss + image_set.loss_weight * flow.flow_matching_step(
                    transformer, run.family, inputs.batch, inputs.noise, inputs.sigmas, text_ids, image_ids[size],
                    guidance, args.weighting_scheme)
        accelerator.backward(loss)
        run.flat_lora.after_backward()
        return loss.detach()

    return step.in_cuda_graph(micro_step, args.cuda_graphs)


def sample_settings(args: argparse.Namespace, settings: TrainSettings, table: embeddings.TextEmbeddings,
                    device: torch.device) -> validation.SampleSettings | None:
    """The sample images' prompts (their embeddings from the file, or encoded now and the encoders freed) and
    settings; None without --validation_prompt."""
    if not args.validation_prompt:
        return None
    family, hub = settings.family, cli.hub_kwargs(args)
    prompts = embeddings.validation_embeddings(table, args.validation_prompt, family,
                                               args.pretrained_model_name_or_path, device, **hub)
    negative = table.prompt("") if family.samples_with_negative else None
    steps, guidance, distilled = 20, 3.5, False  # the defaults on the trained model itself
    if args.validation_model:
        where = f"--validation_model {args.validation_model}"
        index = families.read_model_index(args.validation_model, args.revision, args.cache_dir)  # read once
        if index is None:
            raise UserError(f"{where}: no model_index.json; give a pipeline (its scheduler draws the samples).")
        found = families.from_pipeline_class(index.get("_class_name", "?"), where)
        families.check_same_family(found.name, family, where, "give a model of the trained family")
        (steps, guidance), distilled = family.serving_defaults(index), bool(index.get("is_distilled"))
    return validation.SampleSettings(
        prompts, *settings.sizes.validation, args.validation_inference_steps or steps,
        guidance if args.validation_guidance_scale is None else args.validation_guidance_scale, args.seed, negative,
        args.validation_model, distilled, hub)


def first_step_done(args: argparse.Namespace, stats: RunStats, device: torch.device, main_process: bool) -> None:
    """Start-up is over: how long it took, and (--compile_cache_dir) the graphs compiled for it kept for next time."""
    stats.startup.mark("first_step", device)
    logger.info("First optimizer step done %.0f s after launch (data loaded at %.0f s, model at %.0f s)",
                stats.startup["first_step"], stats.startup["data_loaded"], stats.startup["model_loaded"])
    if main_process:
        compile_cache.save_compile_cache(args.compile_cache_dir)


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


def train(args: argparse.Namespace, settings: TrainSettings, run: Run, stats: RunStats) -> None:
    """The loop, from step `stats.start_step`: micro steps under accumulate(), an optimizer step every
    --gradient_accumulation_steps; each step's loss and time go into `stats`."""
    accelerator, accumulation, device = run.accelerator, args.gradient_accumulation_steps, run.accelerator.device
    rank, max_steps = accelerator.process_index, settings.max_train_steps
    micro_step = make_micro_step(args, run)
    # The memory snapshot only with --compile: recording the allocations crashed the eager NF4 steps (bitsandbytes'
    # own layers; fp32 and bf16, segfault or "SystemError: error return without exception set" on the H200).
    profiler = reports.StepProfiler(args.profile_dir, device, record_memory=args.compile)
    progress = tqdm(total=max_steps, initial=stats.start_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    step_index, clock, pending = stats.start_step, reports.StepClock(), []
    signals = checkpoints.StopSignals(accelerator.num_processes)
    try:  # the bar ends its line before any message below it
        for micro_index in range(stats.start_step * accumulation, max_steps * accumulation):
            inputs = [tensor for image_set in run.sets
                      for tensor in image_set.draw(micro_index, rank, run.vae, device, settings.sampling).flat()]
            with accelerator.accumulate(run.transformer), stats.compiles.micro_step(tuple(inputs[0].shape)):
                loss = micro_step(*inputs)
                if accelerator.sync_gradients:
                    stats.skipped_steps += optimizer_step(run, args.max_grad_norm)
            pending.append(loss.clone())  # a CUDA graph's output is overwritten by its next replay
            if not accelerator.sync_gradients:
                continue
            step_index += 1
            elapsed = clock.lap()
            if step_index == stats.start_step + 1:
                first_step_done(args, stats, device, accelerator.is_main_process)
            if not profiler.profiling(step_index):  # the profiler's own overhead stays out of the timing
                stats.step_times.append(elapsed)
            stop = False  # Ctrl-C / SIGTERM: a checkpoint at this step, then stop (agreed by all processes)
            # Also before a checkpoint, so the losses it stores are complete.
            if (step_index % args.logging_steps == 0 or step_index == max_steps
                    or step_index % args.checkpointing_steps == 0 or signals.forces_sync()):
                # The one host sync per logging interval: the interval's losses come back together, with whether
                # any process got a stop signal (one collective: a second one per step hung loaded DDP runs).
                interval = torch.stack(pending).float().view(-1, accumulation).mean(1)
                *interval, anyone = accelerator.reduce(signals.with_flag(interval).to(device), "mean").tolist()
                stop = anyone > 0 and step_index < max_steps
                checkpoints.check_loss_finite(interval, step_index, args.output_dir)  # before anything is saved
                stats.losses.extend(interval)
                pending = []
                logs = {"loss": interval[-1], "lr": run.lr_scheduler.get_last_lr()[0], "s_per_step": elapsed,
                        "peak_memory_gib": reports.peak_memory_gib(device)}
                accelerator.log(logs, step=step_index)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", s_step=f"{elapsed:.2f}")
            progress.update(1)
            profiler.after_step(step_index)
            if (step_index % args.checkpointing_steps == 0 or stop) and step_index < max_steps:
                path = checkpoints.save_checkpoint(accelerator, args.output_dir, step_index,
                                                   {"losses": stats.losses, "eval_losses": stats.eval_losses,
                                                    "family": run.family.name,
                                                    "num_processes": accelerator.num_processes,
                                                    "config": run_config.recorded_flags(vars(args))},
                                                   args.checkpoints_total_limit)
                logger.info("Saved checkpoint %s", path)
                if stop:
                    signals.stop_here(step_index, path)
            if args.validation_steps and step_index % args.validation_steps == 0 and step_index < max_steps:
                generate_samples(args, settings, run, step_index)
            if step_index % args.eval_steps == 0 or step_index == max_steps:
                evaluate(args, run, stats, step_index)
    finally:
        progress.close()
        profiler.close(step_index)
        signals.restore()
    stats.kernel_s_per_step = profiler.kernel_s_per_step
    stats.cuda_graphs_captured = len(getattr(micro_step, "graphs", ()))
    if stats.skipped_steps:
        logger.warning("%d optimizer step(s) skipped: fp16 gradients overflowed (inf/NaN) and the loss scale was "
                       "lowered. Many skips: use bf16 if the GPU has it, or lower --learning_rate.",
                       stats.skipped_steps)


@torch.no_grad()
def generate_samples(args: argparse.Namespace, settings: TrainSettings, run: Run, step_index: int) -> list[str]:
    """Validation images of --validation_prompt (none without, and none on the other processes)."""
    if run.validation is None or not run.accelerator.is_main_process:
        return []
    scheduler = run.family.load_scheduler(args.validation_model or args.pretrained_model_name_or_path,
                                          {"revision": args.revision, "cache_dir": args.cache_dir})
    with run.ema.weights() if args.validate_ema else nullcontext():
        return validation.sample_images(
            run.accelerator, run.family, run.transformer, run.vae, scheduler, run.validation, Path(args.output_dir),
            step_index, vae_home="cpu" if settings.latents != "none" else run.accelerator.device)


def evaluate(args: argparse.Namespace, run: Run, stats: RunStats, step_index: int) -> None:
    """The held-out eval loss (nothing without --validation_split), on the main process."""
    if run.held_out is None or not run.accelerator.is_main_process:
        return
    model = run.accelerator.unwrap_model(run.transformer)  # no DDP hooks: the other processes don't take part
    guidance = args.guidance_scale if model.config.guidance_embeds else None
    loss = eval_loss(model, run.family, run.held_out, guidance, args.weighting_scheme, run.accelerator.autocast,
                     args.seed)
    stats.eval_losses.append([step_index, loss])
    run.accelerator.log({"eval_loss": loss}, step=step_index)


def finish(args: argparse.Namespace, settings: TrainSettings, run: Run, stats: RunStats,
           samples_before: list[str]) -> dict:
    """Saves the LoRA, the loss plot, after-samples, the run summary and the model card; pushes to the Hub if
    asked. Returns the summary (on the main process; {} on the others)."""
    accelerator, output_dir = run.accelerator, Path(args.output_dir)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(run.transformer)
    summary = {}
    if accelerator.is_main_process:
        with run.flat_lora.master_weights():
            lora_path = lora.save_lora(model, output_dir, fold_alpha=True)
        logger.info("Saved the LoRA to %s", lora_path)
        if args.use_ema:
            with run.ema.weights():
                logger.info("Saved the EMA LoRA to %s",
                            lora.save_lora(model, output_dir, lora.EMA_WEIGHT_NAME, fold_alpha=True))
        if args.export_format:  # the same LoRA in the kohya/ComfyUI layout
            logger.info("Saved the %s LoRA to %s", args.export_format,
                        convert_file(lora_path, output_dir / COMFYUI_WEIGHT_NAME, "comfyui", run.family))
    samples_after = generate_samples(args, settings, run, settings.max_train_steps)
    if accelerator.is_main_process:
        compile_cache.save_compile_cache(args.compile_cache_dir)  # graphs compiled after the first step
        if stats.losses:
            reports.plot_loss(stats.losses, output_dir / "loss.png", stats.eval_losses)
        summary = {
            "steps": settings.max_train_steps, **stats.summary(accelerator.device), "lora": str(lora_path),
            "loss_plot": str(output_dir / "loss.png"), "samples_before": samples_before,
            "samples_after": samples_after, "num_processes": accelerator.num_processes,
            "nf4_layers": models.count_nf4_layers(model), "losses": stats.losses,
        }
        reports.write_summary(output_dir / "train_summary.json", summary)
        logger.info("Run summary (%s): %s", output_dir / "train_summary.json",
                    {k: v for k, v in summary.items() if k != "losses"})
        write_model_card(args, settings, output_dir, samples_after)
        if args.push_to_hub:  # everything is on disk already: a failed upload is one line and the retry command
            reports.push_to_hub(args.output_dir, args.hub_model_id or output_dir.name, args.hub_token)
    return summary


def write_model_card(args: argparse.Namespace, settings: TrainSettings, output_dir: Path,
                     sample_files: list[str]) -> None:
    card = reports.ModelCard(
        base_model=args.pretrained_model_name_or_path, repo_id=args.hub_model_id or args.output_dir,
        title=args.hub_model_id or output_dir.name, rank=args.rank, alpha=args.lora_alpha or args.rank,
        layers=args.lora_layers, steps=settings.max_train_steps,
        base_precision=run_config.base_precision_label(args.base_precision, args.do_fp8_training),
        sizes=settings.sizes.describe(), instance_prompt=args.instance_prompt,
        validation_prompts=args.validation_prompt, sample_files=sample_files,
        comfyui_file=args.export_format and COMFYUI_WEIGHT_NAME, family_label=settings.family.label,
        pipeline_class=settings.family.pipeline_classes[0], inference_steps=settings.family.default_steps)
    (output_dir / "README.md").write_text(card.render())


def end_processes(run: Run) -> None:
    """Ends the trackers and, with several processes, their group without gloo's hang at exit (pytorch#56297: one
    resumed 2-process CPU run in ~15 hung): DDP's reducer, freed with the GIL held, joined a worker waiting for the
    GIL. So the group is held until the DDP wrapper is gone, then freed by torch's binding, which releases it."""
    if not torch.distributed.is_initialized():  # one process: no group
        run.accelerator.end_training()
        return
    group = torch.distributed.group.WORLD
    run.transformer = run.accelerator.unwrap_model(run.transformer)
    run.accelerator.free_memory()  # the accelerator's references to the wrapper
    gc.collect()  # DDP's hooks make reference cycles (each collection ~0.3 s, so only here)
    run.accelerator.end_training()
    del group


def log_run_start(args: argparse.Namespace, settings: TrainSettings, run: Run, start_step: int) -> None:
    """The trackers started, and the run's shape in the log: images, micro steps, batches, optimizer steps."""
    accelerator, order = run.accelerator, run.sets[0].order
    if not accelerator.is_main_process:
        return
    if args.report_to != "none":
        accelerator.init_trackers("flux-qlora", config=run_config.tracker_config(vars(args)))
    logger.info("***** Running training *****")
    logger.info("  images = %d, repeats = %d, micro-steps per epoch = %d", len(run.sets[0].data), args.repeats,
                order.micro_steps_per_epoch)
    logger.info("  batch per device = %d, processes = %d, accumulation = %d -> effective batch %d",
                args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps,
                order.global_batch * args.gradient_accumulation_steps)
    logger.info("  optimizer steps = %d (starting at %d)", settings.max_train_steps, start_step)


def make_optimizer_and_schedule(args: argparse.Namespace, settings: TrainSettings, accelerator: Accelerator,
                                flat_lora: step.FlatLora):
    """8-bit or torch AdamW over the flat fp32 LoRA weights, and the learning-rate schedule; both checkpointed."""
    from diffusers.optimization import get_scheduler

    optimizer = accelerator.prepare(step.make_optimizer(
        [flat_lora.master], args.use_8bit_adam, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon))
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=settings.max_train_steps)
    accelerator.register_for_checkpointing(lr_scheduler)
    return optimizer, lr_scheduler


def main(args: argparse.Namespace) -> dict:
    startup = Startup(main_started=launch_seconds(torch.device("cpu")))  # after Python and the top imports
    settings = validate_args(args)
    check_bf16("--mixed_precision", args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
               Device.for_launch())
    accelerator = make_accelerator(args)
    checkpoints.check_same_run(args.resume_from_checkpoint, args.output_dir, vars(args), flag_defaults(),
                               accelerator.num_processes)
    device, weight_dtype = accelerator.device, models.DTYPES[accelerator.mixed_precision]
    config = models.read_transformer_config(args.pretrained_transformer_model_name_or_path
                                            or args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    # The trainer reads only transformer/, vae/ and scheduler/: a folder of those without model_index.json (the
    # benchmarks' random models) trains, its family read from the transformer's config.
    family = families.detect(args.pretrained_model_name_or_path, config, args.revision, args.cache_dir)
    settings = settings.for_model(family, config, args.lora_layers)
    attention_backend = check_hardware(args, settings, accelerator, weight_dtype, config)
    lora.check_rank(args.rank, config)
    plan = plan_memory(args, settings, accelerator, weight_dtype, config)
    if args.dry_run:
        print(f"Memory plan: {plan.describe()}")
        return {"memory_plan": asdict(plan) | {"peak_gib": plan.peak_gib}}
    if args.compile:
        compile_cache.start_compile_workers(device)  # ready by the first step, instead of starting then
    if accelerator.is_main_process:  # writable, room for a checkpoint, never mixed with another run
        checkpoints.prepare_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir,
                                       int(plan.lora_gib * 2**30) + 2**20)

    table = embeddings.read_embeddings(args.data_df_path)
    embeddings.check_embeddings_fit(table, settings.family, config, args.data_df_path)
    samples = sample_settings(args, settings, table, device)
    images = load_images(args, settings, table, weight_dtype)
    startup.mark("images_indexed", device)  # apart from the VAE: which one is slow
    vae = settings.family.load_vae(args.pretrained_model_name_or_path, device, weight_dtype, cli.hub_kwargs(args))
    startup.mark("vae_loaded", device)
    cache_latents(args, settings, images, vae, accelerator)
    startup.mark("data_loaded", device)
    sets = make_image_sets(args, settings, accelerator, images)
    if settings.max_train_steps is None:
        settings = replace(settings, max_train_steps=math.ceil(
            args.num_train_epochs * sets[0].order.micro_steps_per_epoch / args.gradient_accumulation_steps))
    checkpoints.check_resume_target(args.resume_from_checkpoint, args.output_dir, settings.max_train_steps)
    if accelerator.is_main_process:  # the flags as given: --config of this file runs the same training again
        run_config.write_config(vars(args), Path(args.output_dir) / run_config.CONFIG_NAME,
                                run_config.run_versions(), {"model_family": settings.family.name})

    transformer = load_transformer_with_lora(args, settings, device, weight_dtype, attention_backend)
    model_gib = reports.allocated_gib(device)
    startup.mark("model_loaded", device)
    transformer = accelerator.prepare(transformer)
    # Flattened after DDP wraps the model: flattening before made a 2-process run drift from the 1-process one.
    flat_lora = step.FlatLora(lora.lora_parameters(transformer),
                              step.lora_compute_dtype(accelerator.num_processes, weight_dtype))
    optimizer, lr_scheduler = make_optimizer_and_schedule(args, settings, accelerator, flat_lora)
    checkpoints.register_lora_checkpoint_hooks(accelerator, flat_lora)
    ema = step.LoraEma(flat_lora, args.ema_decay) if args.use_ema else step.NoEma()
    if args.use_ema:
        accelerator.register_for_checkpointing(ema)
    run = Run(accelerator, transformer, flat_lora, ema, optimizer, lr_scheduler, sets, images.held_out, samples,
              vae, settings.family)
    del transformer  # held by `run` alone, which end_processes() unwraps

    resumed = checkpoints.resume(accelerator, args.resume_from_checkpoint, args.output_dir)
    if resumed:
        families.check_same_family(resumed.get("family"), settings.family, f"the checkpoint in {args.output_dir}",
                                   "resume with the model it trained on (or start a new --output_dir)")
    stats = RunStats(resumed.get("global_step", 0), list(resumed.get("losses", [])), model_gib=model_gib,
                     predicted_peak_gib=plan.peak_gib, eval_losses=list(resumed.get("eval_losses", [])),
                     startup=startup)
    log_run_start(args, settings, run, stats.start_step)
    samples_before = generate_samples(args, settings, run, 0) if stats.start_step == 0 else []
    try:
        if stats.start_step == 0:
            evaluate(args, run, stats, 0)
        train(args, settings, run, stats)
        return finish(args, settings, run, stats, samples_before)
    finally:
        end_processes(run)


if __name__ == "__main__":
    args = parse_args()
    cli.scrub_secret_flags(sys.argv)
    cli.setup_logging(args.debug)
    logging.getLogger("train_qlora_flux").setLevel(logging.INFO)
    cli.run_main(main, args, memory_fix="Use less: --gradient_checkpointing, --offload_activations, a smaller "
                 "--resolution, --train_batch_size 1 (--dry_run prints the memory plan); checkpoints already written "
                 "resume with --resume_from_checkpoint latest.")

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
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import AutocastKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from flux_qlora import flow
from flux_qlora.cli import run_main, setup_logging
from flux_qlora.cuda_graphs import CudaGraphStep
from flux_qlora.data import UserError, add_dataset_args, check_dataset_args, check_resolution, load_samples
from flux_qlora.embeddings import read_embeddings
from flux_qlora.lora import (
    INIT_CHOICES,
    FlatLora,
    add_lora,
    load_lora_into,
    lora_parameters,
    save_lora,
    target_modules,
)
from flux_qlora.models import (
    LORA_TARGET_PRESETS,
    WEIGHT_DTYPES,
    add_attention_backend_arg,
    add_model_args,
    check_fp8_device,
    compile_blocks,
    count_nf4_layers,
    enable_fp8_training,
    enable_gradient_checkpointing,
    load_transformer,
    set_attention_backend,
)
from flux_qlora.training import (
    ActivationOffload,
    Schedule,
    TrainData,
    encode_latents,
    find_checkpoint,
    load_pixels,
    match_embeddings,
    model_card,
    plot_loss,
    read_training_state,
    save_checkpoint,
    write_summary,
)

logger = get_logger("train_qlora_flux")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--pretrained_transformer_model_name_or_path", type=str, default=None,
                        help="Train this transformer instead of the pipeline's (Hub id or folder; e.g. a de-distilled "
                             "one, or a pre-quantized NF4 checkpoint). The VAE still comes from the pipeline.")
    add_dataset_args(parser)
    parser.add_argument("--data_df_path", type=str, required=True, help="The parquet of compute_embeddings.py.")
    parser.add_argument("--output_dir", type=str, default="flux-qlora-output", help="LoRA, checkpoints, samples, logs.")
    parser.add_argument("--width", type=int, default=512, help="Training width in pixels (a multiple of 16).")
    parser.add_argument("--height", type=int, default=512, help="Training height in pixels (a multiple of 16).")
    parser.add_argument("--cache_latents", action="store_true",
                        help="Encode every image with the VAE once before training, then move the VAE off the GPU.")
    parser.add_argument("--repeats", type=int, default=1, help="How many times each image appears per epoch.")

    parser.add_argument("--base_precision", type=str, default="nf4", choices=["nf4", "bf16"],
                        help="The frozen base's linear layers: nf4 (QLoRA, ~6 GB for FLUX.1-dev) or bf16 (plain "
                             "LoRA in the --mixed_precision dtype, ~24 GB: for big GPUs).")

    parser.add_argument("--do_fp8_training", action="store_true",
                        help="Run the frozen base's big linears in float8 (torchao) with --base_precision bf16 on a "
                             "GPU of compute capability >= 8.9 (H100, 1024x1024: 0.47 s/step, 24.5 GiB).")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    lora.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")
    lora.add_argument("--init_lora_weights", type=str, default="gaussian", choices=INIT_CHOICES,
                      help="LoRA initialisation (peft's init_lora_weights; B starts at zero except for pissa/olora).")
    lora.add_argument("--lora_layers", type=str, default="attention",
                      help=f"Target modules: a preset ({', '.join(LORA_TARGET_PRESETS)}) or a comma-separated list "
                           "such as 'to_k,to_q,to_v,to_out.0'.")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--train_batch_size", type=int, default=1, help="Images per micro-step per GPU.")
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    opt.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps (overrides epochs).")
    opt.add_argument("--num_train_epochs", type=int, default=1, help="Epochs, when --max_train_steps is not given.")
    opt.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate.")
    opt.add_argument("--lr_scheduler", type=str, default="constant",
                     choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                              "polynomial"], help="Learning-rate schedule.")
    opt.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimizer steps.")
    opt.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit instead of torch AdamW.")
    opt.add_argument("--adam_beta1", type=float, default=0.9)
    opt.add_argument("--adam_beta2", type=float, default=0.999)
    opt.add_argument("--adam_weight_decay", type=float, default=1e-4)
    opt.add_argument("--adam_epsilon", type=float, default=1e-8)
    opt.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 to disable).")
    opt.add_argument("--gradient_checkpointing", action="store_true",
                     help="Recompute block activations in the backward pass: much less memory, ~30%% slower.")
    opt.add_argument("--gradient_checkpointing_interval", type=int, default=1,
                     help="With --gradient_checkpointing: checkpoint only every N-th block (more memory, faster).")
    opt.add_argument("--offload_activations", action="store_true",
                     help="Keep the activations saved for the backward (with --gradient_checkpointing: each block's "
                          "inputs, ~0.5 GiB at 512x768) in pinned CPU memory, copied on a side stream.")
    opt.add_argument("--compile", action="store_true",
                     help="torch.compile each transformer block (regional compilation: one graph reused by all "
                          "blocks of a kind; NF4 layers become fused kernels, checkpointed blocks recompute inside "
                          "their compiled backward); the first step takes ~1 minute to compile.")
    opt.add_argument("--cuda_graphs", action="store_true",
                     help="Capture each micro step (forward, backward, gradient gather) in a CUDA graph after two "
                          "warm-up steps and replay it: the CPU no longer launches thousands of kernels per step. "
                          "One GPU, --mixed_precision bf16/fp16; best with --compile.")
    add_attention_backend_arg(opt, "_native_flash on a GPU, PyTorch SDPA's choice on the CPU")
    opt.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                     help="Compute dtype (default: accelerate's config, bf16 in accelerate.yaml).")
    opt.add_argument("--seed", type=int, default=0, help="Seed of the sample order, noise and LoRA init.")

    fm = parser.add_argument_group("flow matching")
    fm.add_argument("--weighting_scheme", type=str, default="none", choices=flow.WEIGHTING_SCHEMES,
                    help="Timestep density / loss weighting (SD3 paper).")
    fm.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal density.")
    fm.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit_normal density.")
    fm.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode density.")
    fm.add_argument("--timestep_shift", type=str, default="1.0",
                    help="Shift of the sampled sigmas towards noise: a number (1.0 = none, 3.0 = SD3) or 'auto' "
                         "(FLUX.1-dev's resolution-dependent shift).")
    fm.add_argument("--guidance_scale", type=float, default=1.0,
                    help="Value of the guidance vector during training (FLUX.1-dev is guidance-distilled; 1.0).")

    out = parser.add_argument_group("checkpoints, validation, logging")
    out.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    out.add_argument("--resume_from_checkpoint", type=str, default=None,
                     help="'latest' (newest checkpoint in --output_dir; a fresh start if none) or a path.")
    out.add_argument("--validation_prompt", type=str, action="append", default=[],
                     help="Prompt for sample images (repeatable); must have been embedded by compute_embeddings.py.")
    out.add_argument("--validation_steps", type=int, default=0,
                     help="Sample images every N steps (0: only before and after training).")
    out.add_argument("--validation_inference_steps", type=int, default=20, help="Denoising steps of sample images.")
    out.add_argument("--validation_guidance_scale", type=float, default=3.5, help="Guidance of sample images.")
    out.add_argument("--report_to", type=str, default="tensorboard", choices=["tensorboard", "wandb", "none"],
                     help="Where to log loss, lr, s/step, peak memory and sample images.")
    out.add_argument("--logging_steps", type=int, default=10,
                     help="Read the loss back from the GPU every N steps (each read waits for the GPU).")
    out.add_argument("--profile_dir", type=str, default=None,
                     help="Profile optimizer steps 5-7 with torch.profiler: a Chrome trace, kernel and CPU tables, "
                          "a CUDA memory snapshot (pytorch.org/memory_viz) here, and the share of time the GPU was "
                          "busy in train_summary.json.")
    out.add_argument("--push_to_hub", action="store_true", help="Upload the LoRA and a model card to the Hub.")
    out.add_argument("--hub_model_id", type=str, default=None, help="Hub repo (default: the output folder's name).")
    out.add_argument("--hub_token", type=str, default=None, help="Hub token (default: your `hf auth login`).")
    out.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    return parser.parse_args(input_args)


def validate_args(args: argparse.Namespace) -> None:
    """Every cross-flag check, before anything heavy loads."""
    check_dataset_args(args)
    check_resolution(args.width, args.height)
    for name in ("rank", "train_batch_size", "gradient_accumulation_steps", "repeats", "num_train_epochs",
                 "checkpointing_steps", "logging_steps", "gradient_checkpointing_interval"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 1.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise UserError(f"--max_train_steps {args.max_train_steps} must be at least 1.")
    if args.timestep_shift != "auto":
        try:
            if float(args.timestep_shift) <= 0:
                raise ValueError
        except ValueError:
            raise UserError(f"--timestep_shift {args.timestep_shift} must be a positive number or 'auto'.") from None
    if args.push_to_hub and args.hub_token is None:
        from huggingface_hub import get_token

        if get_token() is None:
            raise UserError("--push_to_hub needs a Hub token: run `hf auth login` or pass --hub_token.")
    if args.do_fp8_training and args.base_precision != "bf16":
        raise UserError("--do_fp8_training runs a bf16 base in float8: add --base_precision bf16 (NF4 layers are "
                        "already 4-bit and are not converted).")
    if args.cuda_graphs and args.offload_activations:
        raise UserError("--cuda_graphs and --offload_activations don't combine (the offload's copies are decided "
                        "on the CPU at every step): drop one.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("To use 8-bit Adam, please install the bitsandbytes library: "
                            "`pip install bitsandbytes`.") from None


def check_cuda_graphs(accelerator: Accelerator, compute_dtype: torch.dtype) -> None:
    if accelerator.device.type != "cuda":
        raise UserError("--cuda_graphs needs an NVIDIA GPU (no CUDA device here): drop the flag.")
    if accelerator.num_processes > 1 or compute_dtype == torch.float32:
        raise UserError("--cuda_graphs runs on one GPU with --mixed_precision bf16 or fp16 (this run: "
                        f"{accelerator.num_processes} processes, {accelerator.mixed_precision}): drop the flag.")


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to, project_config=project,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported():
        logger.warning("fp16 on a GPU that supports bf16: bf16 is safer (fp16 overflows give NaN losses).")
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator


def load_train_data(args, accelerator, weight_dtype) -> tuple[TrainData, object]:
    """Images + their embeddings; latents cached (VAE then moved to the CPU) with --cache_latents."""
    from diffusers import AutoencoderKL

    samples = load_samples(args)
    table = read_embeddings(args.data_df_path)
    embeddings = match_embeddings(samples, table, args.data_df_path)
    validation = {prompt: table.prompt(prompt) for prompt in args.validation_prompt}  # fails now, not in an hour
    pixels = load_pixels(samples, args.width, args.height)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision,
                                        variant=args.variant, cache_dir=args.cache_dir, dtype=weight_dtype)
    vae.requires_grad_(False).to(accelerator.device)
    data = TrainData(keys=embeddings.keys, prompt_embeds=embeddings.prompt_embeds.to(weight_dtype),
                     pooled_prompt_embeds=embeddings.pooled_prompt_embeds.to(weight_dtype),
                     text_ids=embeddings.text_ids.to(weight_dtype), images=pixels, validation=validation)
    if args.cache_latents:
        data.images = encode_latents(vae, pixels, show_progress=accelerator.is_local_main_process).cpu()
        data.latents_cached = True
        vae.to("cpu")  # only needed again to decode sample images
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logger.info("%d images at %dx%d, embeddings of %d tokens%s", len(data), args.width, args.height,
                data.prompt_embeds.shape[1], ", latents cached" if args.cache_latents else "")
    return data, vae


def load_transformer_with_lora(args, accelerator, weight_dtype):
    transformer = load_transformer(args.pretrained_transformer_model_name_or_path or args.pretrained_model_name_or_path,
                                   accelerator.device, weight_dtype, revision=args.revision, variant=args.variant,
                                   cache_dir=args.cache_dir, nf4=args.base_precision == "nf4")
    # Like peft's prepare_model_for_kbit_training, minus its up-cast of every non-quantized weight to fp32
    # (~1 GB on Flux, no quality gain measured by others): only the LoRA weights are trained, in fp32.
    set_seed(args.seed)
    add_lora(transformer, args.rank, args.lora_alpha, args.init_lora_weights, target_modules(args.lora_layers))
    if args.do_fp8_training:
        enable_fp8_training(transformer, accelerator.device)
    backend = args.attention_backend
    if backend is None and accelerator.device.type == "cuda":
        # The cuDNN attention PyTorch picks on the H100 broke in the backward once the projections fed it bf16
        # directly (bf16 base: "mha_graph.execute ... is_good()"; NF4 base: illegal memory access, zero LoRA
        # gradients); its flash kernel trains correctly (BENCHMARKS.md).
        backend = "_native_flash"
    elif backend and "cudnn" in backend and accelerator.device.type == "cuda":
        logger.warning("--attention_backend %s: on the H100 its backward failed or gave zero LoRA gradients in "
                       "our tests (BENCHMARKS.md); check that the loss falls.", backend)
    set_attention_backend(transformer, backend)
    if args.compile:
        compile_blocks(transformer)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(transformer, args.gradient_checkpointing_interval, compiled=args.compile)
    transformer.train()
    trainable = sum(p.numel() for p in lora_parameters(transformer))
    logger.info("LoRA rank %d on %s: %.2fM trainable parameters; %d NF4 layers", args.rank, args.lora_layers,
                trainable / 1e6, count_nf4_layers(transformer))
    return transformer


def make_optimizer(args, params):
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
              "weight_decay": args.adam_weight_decay, "eps": args.adam_epsilon}
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def register_lora_checkpoint_hooks(accelerator, flat_lora: FlatLora) -> None:
    """Makes every checkpoint folder hold just the LoRA (a loadable `pytorch_lora_weights.safetensors`, fp32)."""

    def save_model_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:
                with flat_lora.master_weights():
                    save_lora(accelerator.unwrap_model(model), output_dir)
            if weights:
                weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            with flat_lora.master_weights():
                load_lora_into(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


@dataclass
class Batch:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor


def get_batch(data: TrainData, rows: torch.Tensor, vae, device, dtype) -> Batch:
    images = data.images[rows]
    latents = images.to(device, dtype) if data.latents_cached else encode_latents(vae, images, show_progress=False)
    return Batch(latents, data.prompt_embeds[rows].to(device, non_blocking=True),
                 data.pooled_prompt_embeds[rows].to(device, non_blocking=True))


def sample_sigmas(args, schedule: Schedule, micro_step: int, rank: int, latent_shape) -> tuple[torch.Tensor, ...]:
    """(noise, sigmas) for this process's share of the global batch, drawn from the micro step's own generator."""
    generator = schedule.generator(micro_step)
    b = schedule.batch_size
    noise = torch.randn((schedule.global_batch, *latent_shape), generator=generator)[rank * b : (rank + 1) * b]
    u = flow.sample_density(args.weighting_scheme, schedule.global_batch, generator, args.logit_mean,
                            args.logit_std, args.mode_scale)[rank * b : (rank + 1) * b]
    sigmas = flow.sigmas_from_density(u)
    h, w = latent_shape[-2:]
    shift = flow.resolution_shift(h * w // 4) if args.timestep_shift == "auto" else float(args.timestep_shift)
    return noise, flow.shift_sigmas(sigmas, shift) if shift != 1.0 else sigmas


def flow_matching_step(transformer, batch: Batch, noise, sigmas, text_ids, image_ids, args,
                       guidance_embeds: bool) -> torch.Tensor:
    """One forward pass and its loss: noise the latents to sigma, predict the velocity (noise - latents)."""
    latents = batch.latents
    sig = sigmas.view(-1, 1, 1, 1).to(latents.device)
    noise = noise.to(latents.device, latents.dtype)
    noisy = ((1 - sig) * latents.float() + sig * noise.float()).to(latents.dtype)
    guidance = torch.full((latents.shape[0],), args.guidance_scale, device=latents.device)
    model_pred = transformer(
        hidden_states=flow.pack_latents(noisy), timestep=sig.flatten().to(latents.dtype),
        guidance=guidance if guidance_embeds else None,
        pooled_projections=batch.pooled_prompt_embeds, encoder_hidden_states=batch.prompt_embeds,
        txt_ids=text_ids, img_ids=image_ids, return_dict=False,
    )[0]
    model_pred = flow.unpack_latents(model_pred, *latents.shape[-2:])
    return flow.flow_matching_loss(model_pred, noise, latents, sig.flatten(), args.weighting_scheme)


@torch.no_grad()
def generate_samples(args, accelerator, transformer, vae, data: TrainData, step: int) -> list[str]:
    """Validation images from the training transformer (no second copy), VAE on the GPU only to decode."""
    if not args.validation_prompt or not accelerator.is_main_process:
        return []
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model = accelerator.unwrap_model(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir)
    vae.to(accelerator.device)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=model, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    folder = Path(args.output_dir) / "samples"
    folder.mkdir(exist_ok=True)
    was_training = model.training
    model.eval()
    files = []
    with accelerator.autocast():
        for i, prompt in enumerate(args.validation_prompt):
            prompt_embeds, pooled = data.validation[prompt]
            image = pipe(prompt_embeds=prompt_embeds.to(accelerator.device, vae.dtype),
                         pooled_prompt_embeds=pooled.to(accelerator.device, vae.dtype),
                         width=args.width, height=args.height, num_inference_steps=args.validation_inference_steps,
                         guidance_scale=args.validation_guidance_scale,
                         generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
            files.append(f"samples/step-{step:06d}-{i}.png")
            image.save(Path(args.output_dir) / files[-1])
            log_image(accelerator, prompt, image, step, i)
    model.train(was_training)
    if args.cache_latents:
        vae.to("cpu")
    logger.info("Sample images for step %d in %s", step, folder)
    return files


def log_image(accelerator, prompt: str, image, step: int, index: int) -> None:
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(f"samples/{index}", np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({f"samples/{index}": wandb.Image(image, caption=prompt)}, step=step)


def peak_memory_gib(device, reserved: bool = False) -> float:
    """Peak GPU memory held by tensors (allocated) or by PyTorch's caching allocator (reserved); 0 on the CPU."""
    if device.type != "cuda":
        return 0.0
    return (torch.cuda.max_memory_reserved(device) if reserved else torch.cuda.max_memory_allocated(device)) / 2**30


def train(args, accelerator, transformer, optimizer, lr_scheduler, data, schedule, vae, start_step, losses,
          flat_lora) -> dict:
    """The loop: micro-steps under accumulate(), an optimizer step every --gradient_accumulation_steps."""
    device, dtype = accelerator.device, data.prompt_embeds.dtype
    image_ids = flow.latent_image_ids(args.height // 8, args.width // 8, device=device, dtype=dtype)
    text_ids = data.text_ids.to(device)
    guidance_embeds = accelerator.unwrap_model(transformer).config.guidance_embeds  # DDP hides .config
    step_times, pending = [], []
    progress = tqdm(total=args.max_train_steps, initial=start_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    step, tick = start_step, time.perf_counter()
    profiler = StepProfiler(args.profile_dir, device) if args.profile_dir else None
    offload = ActivationOffload(device) if args.offload_activations else None
    # Inside a CUDA graph autocast must not cache casts across calls (the cache would outlive the capture).
    autocast = AutocastKwargs(cache_enabled=False) if args.cuda_graphs else None

    def micro_step(latents, prompt_embeds, pooled_prompt_embeds, noise, sigmas) -> torch.Tensor:
        """Forward, backward and (with a compute copy) the fp32 gradient gather: GPU work only, so capturable."""
        with accelerator.autocast(autocast), offload.hooks(transformer) if offload else nullcontext():
            loss = flow_matching_step(transformer, Batch(latents, prompt_embeds, pooled_prompt_embeds), noise,
                                      sigmas, text_ids, image_ids, args, guidance_embeds)
        accelerator.backward(loss)
        if flat_lora.gathers_each_micro_step:
            flat_lora.gather_grads()
        return loss.detach()

    run_micro_step = CudaGraphStep(micro_step) if args.cuda_graphs else micro_step
    for micro_step_index in range(start_step * args.gradient_accumulation_steps,
                                  args.max_train_steps * args.gradient_accumulation_steps):
        rows = schedule.rows(micro_step_index, accelerator.process_index)
        batch = get_batch(data, rows, vae, device, dtype)
        noise, sigmas = sample_sigmas(args, schedule, micro_step_index, accelerator.process_index,
                                      tuple(batch.latents.shape[1:]))
        with accelerator.accumulate(transformer):
            loss = run_micro_step(batch.latents, batch.prompt_embeds, batch.pooled_prompt_embeds,
                                  noise.to(device, non_blocking=True), sigmas.to(device, non_blocking=True))
            if accelerator.sync_gradients:
                if not flat_lora.gathers_each_micro_step:
                    flat_lora.gather_grads()
                if args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_([flat_lora.master], args.max_grad_norm)
                optimizer.step()
                flat_lora.sync()
                flat_lora.zero_grad()
        pending.append(loss.clone())  # a CUDA graph's output is overwritten by its next replay
        if not accelerator.sync_gradients:
            continue
        lr_scheduler.step()
        step += 1
        now = time.perf_counter()
        elapsed, tick = now - tick, now
        if not (profiler and profiler.profiling(step)):  # the profiler's own overhead stays out of the timing
            step_times.append(elapsed)
        checkpoint_now = step % args.checkpointing_steps == 0 and step < args.max_train_steps
        # Also before a checkpoint, so the losses it stores are complete.
        if step % args.logging_steps == 0 or step == args.max_train_steps or checkpoint_now:
            # One host sync per logging interval: the losses of the interval come back together.
            interval = torch.stack(pending).float().view(-1, args.gradient_accumulation_steps).mean(1)
            interval = accelerator.reduce(interval.to(device), reduction="mean").tolist()
            losses.extend(interval)
            pending = []
            logs = {"loss": interval[-1], "lr": lr_scheduler.get_last_lr()[0], "s_per_step": elapsed,
                    "peak_memory_gib": peak_memory_gib(device)}
            accelerator.log(logs, step=step)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", s_step=f"{logs['s_per_step']:.2f}")
        progress.update(1)
        if profiler:
            profiler.after_step(step)
        if checkpoint_now:
            path = save_checkpoint(accelerator, args.output_dir, step, {"losses": losses}, args.checkpoints_total_limit)
            logger.info("Saved checkpoint %s", path)
        if args.validation_steps and step % args.validation_steps == 0 and step < args.max_train_steps:
            generate_samples(args, accelerator, transformer, vae, data, step)
    progress.close()
    return {"step_times": step_times, "gpu_kernel_s_per_step": profiler.kernel_s_per_step if profiler else None}


class StepProfiler:
    """Profiles optimizer steps 5-7 (after warm-up and compilation): the GPU's kernel time per step, which the run
    summary divides by the median (unprofiled) step time to say how busy the GPU was."""

    first, last = 5, 7

    def __init__(self, folder: str, device):
        self.folder, self.device, self.kernel_s_per_step = Path(folder), device, None
        self.profile = None

    def profiling(self, step: int) -> bool:
        return self.first <= step <= self.last

    def after_step(self, step: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if step == self.first - 1:
            self.profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.profile.__enter__()
            if self.device.type == "cuda":  # every allocation with its stack, for pytorch.org/memory_viz
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self.start = time.perf_counter()
        elif step == self.last and self.profile is not None:
            torch.cuda.synchronize(self.device) if self.device.type == "cuda" else None
            self.profile.__exit__(None, None, None)
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.device.type == "cuda":
                torch.cuda.memory._dump_snapshot(str(self.folder / "memory_snapshot.pickle"))
                torch.cuda.memory._record_memory_history(enabled=None)
            # Kernels only: operator rows and user annotations (e.g. "Optimizer.step") repeat their kernels' time.
            kernels_us = sum(e.device_time_total for e in self.profile.events()
                             if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)
            self.kernel_s_per_step = kernels_us / 1e6 / (self.last - self.first + 1)
            self.profile.export_chrome_trace(str(self.folder / "trace.json"))
            table = self.profile.key_averages().table
            (self.folder / "top_kernels.txt").write_text(table(sort_by="self_cuda_time_total", row_limit=40))
            (self.folder / "top_cpu.txt").write_text(table(sort_by="self_cpu_time_total", row_limit=40))
            logger.info("Profiled steps %d-%d: %.3f s of GPU kernels per step (trace in %s)", self.first, self.last,
                        self.kernel_s_per_step, self.folder)


def resume(args, accelerator) -> tuple[int, list[float]]:
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    if checkpoint is None:
        return 0, []
    accelerator.load_state(str(checkpoint))
    state = read_training_state(checkpoint)
    logger.info("Resumed from %s at step %d", checkpoint, state["global_step"])
    return state["global_step"], list(state.get("losses", []))


def finish(args, accelerator, transformer, flat_lora, vae, data, losses, timing, start_step, samples_before) -> dict:
    """Saves the LoRA, the loss plot, after-samples and the run summary; pushes to the Hub if asked."""
    output_dir = Path(args.output_dir)
    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        with flat_lora.master_weights():
            lora_path = save_lora(accelerator.unwrap_model(transformer), output_dir)
        logger.info("Saved the LoRA to %s", lora_path)
    samples_after = generate_samples(args, accelerator, transformer, vae, data, args.max_train_steps)
    if accelerator.is_main_process:
        if losses:
            plot_loss(losses, output_dir / "loss.png")
        times = sorted(timing["step_times"][1:] or timing["step_times"])  # the first step includes warm-up
        median = times[len(times) // 2] if times else None
        kernel_s = timing["gpu_kernel_s_per_step"]
        summary = {
            "steps": args.max_train_steps, "resumed_from_step": start_step, "median_s_per_step": median,
            "peak_gpu_memory_gib": round(peak_memory_gib(accelerator.device), 3),
            "peak_reserved_gpu_memory_gib": round(peak_memory_gib(accelerator.device, reserved=True), 3),
            "model_gpu_memory_gib": timing["model_memory_gib"], "gpu_kernel_s_per_step": kernel_s,
            "gpu_busy_percent": round(100 * kernel_s / median, 1) if kernel_s and median else None,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "first_loss": losses[0] if losses else None,
            "lora": str(output_dir / "pytorch_lora_weights.safetensors"),
            "loss_plot": str(output_dir / "loss.png"), "samples_before": samples_before,
            "samples_after": samples_after, "num_processes": accelerator.num_processes,
            "nf4_layers": count_nf4_layers(accelerator.unwrap_model(transformer)), "losses": losses,
        }
        write_summary(output_dir / "train_summary.json", summary)
        logger.info("Run summary (%s): %s", output_dir / "train_summary.json",
                    {k: v for k, v in summary.items() if k != "losses"})
        (output_dir / "README.md").write_text(model_card(args, samples_after))
        if args.push_to_hub:
            push_to_hub(args)
    accelerator.end_training()
    return summary


def push_to_hub(args) -> None:
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token, commit_message="flux-qlora LoRA",
                  ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*"])
    logger.info("Pushed to https://huggingface.co/%s", repo_id)


def main(args: argparse.Namespace) -> dict:
    validate_args(args)
    accelerator = make_accelerator(args)
    if args.do_fp8_training:
        check_fp8_device(accelerator.device, "--do_fp8_training")  # before anything loads
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    data, vae = load_train_data(args, accelerator, weight_dtype)
    schedule = Schedule(len(data), args.repeats, args.train_batch_size, accelerator.num_processes, args.seed)
    if schedule.micro_steps_per_epoch == 0:
        raise UserError(f"{len(data)} images x {args.repeats} repeats is less than one global batch "
                        f"({schedule.global_batch}); lower --train_batch_size or raise --repeats.")
    if args.max_train_steps is None:
        args.max_train_steps = math.ceil(
            args.num_train_epochs * schedule.micro_steps_per_epoch / args.gradient_accumulation_steps)

    transformer = load_transformer_with_lora(args, accelerator, weight_dtype)
    model_memory_gib = torch.cuda.memory_allocated(accelerator.device) / 2**30 if torch.cuda.is_available() else 0.0
    transformer = accelerator.prepare(transformer)
    # Flattened after DDP wraps the model: flattening before made a 2-process run drift from the 1-process one.
    # DDP reduces the weights' own (fp32) gradients, so the low-precision compute copy is for one process only.
    compute_dtype = weight_dtype if accelerator.num_processes == 1 else torch.float32
    if args.cuda_graphs:
        check_cuda_graphs(accelerator, compute_dtype)
    flat_lora = FlatLora(lora_parameters(transformer), compute_dtype)
    optimizer = accelerator.prepare(make_optimizer(args, [flat_lora.master]))
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    accelerator.register_for_checkpointing(lr_scheduler)
    register_lora_checkpoint_hooks(accelerator, flat_lora)
    start_step, losses = resume(args, accelerator)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("flux-qlora", config={k: v for k, v in vars(args).items()
                                                        if isinstance(v, int | float | str | bool)})

    logger.info("***** Running training *****")
    logger.info("  images = %d, repeats = %d, micro-steps per epoch = %d", len(data), args.repeats,
                schedule.micro_steps_per_epoch)
    logger.info("  batch per device = %d, processes = %d, accumulation = %d -> effective batch %d",
                args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps,
                schedule.global_batch * args.gradient_accumulation_steps)
    logger.info("  optimizer steps = %d (starting at %d)", args.max_train_steps, start_step)
    samples_before = generate_samples(args, accelerator, transformer, vae, data, 0) if start_step == 0 else []
    timing = train(args, accelerator, transformer, optimizer, lr_scheduler, data, schedule, vae, start_step, losses,
                   flat_lora)
    timing["model_memory_gib"] = round(model_memory_gib, 3)
    return finish(args, accelerator, transformer, flat_lora, vae, data, losses, timing, start_step, samples_before)


if __name__ == "__main__":
    args = parse_args()
    setup_logging(args.debug)
    logging.getLogger("train_qlora_flux").setLevel(logging.INFO)
    run_main(main, args)

"""The trainer's settings: its flag groups, the checks of their values and combinations, the pitfall warnings, and
`resolve(args) -> TrainSettings`, called once before anything loads.

`args` stays what the user typed (training_config.toml records it, so --config of that file runs the same training);
what is derived from the flags (the sizes and buckets, where latents are cached, the timestep sampling, the step
count) lives in `TrainSettings` only.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace

from flux_qlora import flow
from flux_qlora.buckets import TrainingSizes, resolve_sizes
from flux_qlora.cli import add_attention_backend_arg, add_compile_cache_arg, check_compile_cache_dir, check_dataset_args
from flux_qlora.errors import UserError
from flux_qlora.families import Family
from flux_qlora.families.flux1 import FLUX1
from flux_qlora.lora import INIT_CHOICES, PRESET_NAMES, target_modules
from flux_qlora.memory import TrainingShape


@dataclass(frozen=True)
class TrainSettings:
    """What the trainer derives from its flags, resolved once."""

    sizes: TrainingSizes
    latents: str  # where latents are cached: "none" (encoded each step), "memory" or "disk" (--cache_latents_dir)
    sampling: flow.TimestepSampling
    max_train_steps: int | None  # --max_train_steps; None until the sample order gives it from --num_train_epochs
    family: Family = FLUX1  # the model's (read from it once the flags are checked: `for_model`)
    lora_targets: tuple[str, ...] = ()  # the module names --lora_layers names in this model

    def for_model(self, family: Family, config: dict, lora_layers: str) -> TrainSettings:
        """The settings for a transformer of `family` and `config`: its resolution-dependent timestep shift, the
        module names of --lora_layers."""
        return replace(self, family=family, lora_targets=tuple(target_modules(lora_layers, family, config)),
                       sampling=replace(self.sampling, resolution_shift=family.resolution_shift))


def resolve(args: argparse.Namespace) -> TrainSettings:
    """Every check of the trainer's flags, before anything heavy loads; the derived settings."""
    check_dataset_args(args)
    sizes = resolve_sizes(args.resolution, args.bucket_step, args.width, args.height)
    check_ranges(args)
    warn_about_pitfalls(args)
    sampling = timestep_sampling(args)
    check_flag_combinations(args)
    latents = "disk" if args.cache_latents_dir else "memory" if args.cache_latents else "none"
    # FLUX.1 until the model is read (`for_model`): the flag-only checks need no model.
    return TrainSettings(sizes, latents, sampling, args.max_train_steps).for_model(FLUX1, {}, args.lora_layers)


def training_shape(args: argparse.Namespace, settings: TrainSettings, text_tokens: int, num_images: int,
                   compute_bytes: int) -> TrainingShape:
    """The trainer's settings as the memory plan's `TrainingShape`, at the largest training size (it sets the
    peak); `text_tokens` and `num_images` from the embeddings file."""
    width, height = settings.sizes.largest
    return TrainingShape(
        width=width, height=height, text_tokens=text_tokens,
        batch_size=args.train_batch_size * (2 if args.class_data_dir else 1),  # a regularisation batch beside it
        nf4=args.base_precision == "nf4", compute_bytes=compute_bytes, rank=args.rank,
        targets=settings.lora_targets, eight_bit_adam=args.use_8bit_adam,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpointing_interval=args.gradient_checkpointing_interval, offload_activations=args.offload_activations,
        num_images=num_images, latents=settings.latents)


def add_base_precision_args(parser: argparse.ArgumentParser) -> None:
    """The trainer's frozen base: NF4 (QLoRA) or bf16, optionally with FP8 compute."""
    group = parser.add_argument_group("base model precision")
    group.add_argument("--base_precision", type=str, default="nf4", choices=["nf4", "bf16"],
                       help="The frozen base's linear layers: nf4 (QLoRA, ~6 GB for FLUX.1-dev) or bf16 (plain "
                            "LoRA in the --mixed_precision dtype, ~24 GB: for big GPUs).")
    group.add_argument("--do_fp8_training", action="store_true",
                       help="The frozen base's products on FP8 tensor cores (compute capability >= 8.9, bf16): an "
                            "NF4 base (with --compile) dequantizes its 4-bit weights straight to FP8, a bf16 base's "
                            "big linears run in torchao's float8 (speed and memory: BENCHMARKS.md).")


def add_image_args(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags for what it makes of each image: one size or aspect-ratio buckets, crops, flips, repeats,
    caption dropout, cached latents."""
    group = parser.add_argument_group("images: sizes, buckets, augmentation")
    group.add_argument("--width", type=int, default=None,
                       help="Train every image at this width (a multiple of 16; default 512), center-cropped; or use "
                            "--resolution.")
    group.add_argument("--height", type=int, default=None, help="With --width: the height (default 512).")
    group.add_argument("--resolution", type=str, default=None,
                       help="Aspect-ratio buckets of about NxN pixels (e.g. 1024; several train each image at each: "
                            "512,768,1024): each image trains at the size of its nearest aspect ratio (1:2.5 to "
                            "2.5:1).")
    group.add_argument("--bucket_step", type=int, default=64,
                       help="Bucket sides are multiples of this (a multiple of 16): fewer, coarser shapes compile "
                            "and capture fewer graphs.")
    group.add_argument("--crop", type=str, default="center", choices=["center", "random"],
                       help="Where an image scaled to cover its size is cropped: centered, or at a random place "
                            "each epoch (with --cache_latents: one random place per image).")
    group.add_argument("--random_flip", action="store_true",
                       help="Mirror half of the images each epoch (with --cache_latents both are encoded once).")
    group.add_argument("--cache_latents", action="store_true",
                       help="Encode every image with the VAE once before training, then move the VAE off the GPU.")
    group.add_argument("--cache_latents_dir", type=str, default=None,
                       help="Cache the latents in this folder instead of in memory (implies --cache_latents): one "
                            "file per image, named by its pixels, size, crop, mask, VAE and dtype, reused by later "
                            "runs; read per batch, so large sets stay on disk.")
    group.add_argument("--repeats", type=int, default=1, help="How many times each image appears per epoch.")
    group.add_argument("--alpha_mask", action="store_true",
                       help="Use each image's alpha channel as its loss mask (where it is transparent the loss "
                            "doesn't count); a NAME_mask.png beside an image is its mask without this flag.")
    group.add_argument("--caption_dropout", type=float, default=0.0,
                       help="Share of samples trained on the empty caption instead of theirs (e.g. 0.1).")


def open_fraction(text: str) -> float:
    """argparse type: a number above 0 and below 1 (NaN is neither)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.999)") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be above 0 and below 1 (e.g. 0.999)")
    return value


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """The trainer's LoRA flags: rank, alpha, initialisation, target layers, EMA."""
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    lora.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")
    lora.add_argument("--init_lora_weights", type=str, default="gaussian", choices=INIT_CHOICES,
                      help="LoRA initialisation (peft's init_lora_weights; B starts at zero except for pissa/olora).")
    lora.add_argument("--lora_layers", type=str, default="attention",
                      help=f"Target modules: a preset ({', '.join(PRESET_NAMES)}) or a comma-separated list "
                           "such as 'to_k,to_q,to_v,to_out.0'.")
    lora.add_argument("--use_ema", action="store_true",
                      help="Keep an exponential moving average of the LoRA weights, saved beside the LoRA as "
                           "pytorch_lora_weights_ema.safetensors (diffusers loads it with weight_name=...).")
    lora.add_argument("--ema_decay", type=open_fraction, default=0.999,
                      help="EMA decay per optimizer step, above 0 and below 1 (0 would copy the weights, 1 never "
                           "move from the initial ones).")
    lora.add_argument("--validate_ema", action="store_true", help="Draw the validation images with the EMA weights.")


def add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    """The trainer's optimisation flags: batch, steps, learning rate, optimizer, and the speed and memory switches."""
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
                     help="Recompute block activations in the backward pass: much less memory, slower "
                          "(BENCHMARKS.md).")
    opt.add_argument("--gradient_checkpointing_interval", type=int, default=1,
                     help="With --gradient_checkpointing: checkpoint only every N-th block (more memory, faster).")
    opt.add_argument("--offload_activations", action="store_true",
                     help="Keep the activations saved for the backward (with --gradient_checkpointing: each block's "
                          "inputs) in pinned CPU memory, copied on a side stream.")
    opt.add_argument("--compile", action="store_true",
                     help="torch.compile each transformer block (regional compilation: one graph reused by all "
                          "blocks of a kind; NF4 layers become fused kernels, checkpointed blocks recompute inside "
                          "their compiled backward); the first step waits for the compilation (BENCHMARKS.md).")
    add_compile_cache_arg(opt)
    opt.add_argument("--cuda_graphs", action="store_true",
                     help="Capture each micro step (forward, backward, gradient gather) in a CUDA graph after two "
                          "warm-up steps and replay it: the CPU no longer launches thousands of kernels per step. "
                          "One GPU, --mixed_precision bf16/fp16; best with --compile.")
    add_attention_backend_arg(opt, "_native_cudnn from compute capability 9.0, else _native_flash where the GPU has "
                                   "it in this dtype, else _native_efficient")
    opt.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                     help="Compute dtype (default: accelerate's config, bf16 in accelerate.yaml).")
    opt.add_argument("--seed", type=int, default=0, help="Seed of the sample order, noise and LoRA init.")


def add_flow_matching_args(parser: argparse.ArgumentParser) -> None:
    """The trainer's flow-matching flags: where on the noise schedule samples train, and the guidance vector."""
    fm = parser.add_argument_group("flow matching")
    fm.add_argument("--weighting_scheme", type=str, default="none", choices=flow.WEIGHTING_SCHEMES,
                    help="Timestep density / loss weighting (SD3 paper).")
    fm.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal density.")
    fm.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit_normal density.")
    fm.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode density.")
    fm.add_argument("--timestep_shift", type=str, default="1.0",
                    help="Shift of the sampled sigmas towards noise: a number (1.0 = none, 3.0 = SD3) or 'auto' "
                         "(FLUX.1-dev's resolution-dependent shift).")
    fm.add_argument("--prior_loss_weight", type=float, default=1.0,
                    help="Weight of the regularisation images' loss (--class_data_dir), as diffusers' DreamBooth "
                         "trainers define it: loss = instance loss + weight x prior loss.")
    fm.add_argument("--guidance_scale", type=float, default=1.0,
                    help="Value of the guidance vector during training (FLUX.1-dev is guidance-distilled; 1.0).")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags for what it leaves behind: checkpoints, validation images, the eval loss, logs, profiles,
    the Hub upload."""
    out = parser.add_argument_group("checkpoints, validation, logging")
    out.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    out.add_argument("--overwrite_output_dir", action="store_true",
                     help="Start a new run in an --output_dir that holds another run: its checkpoints and LoRA are "
                          "deleted first (without it such a folder is refused, so runs never mix).")
    out.add_argument("--resume_from_checkpoint", type=str, default=None,
                     help="'latest' (newest checkpoint in --output_dir; a fresh start if none) or a path.")
    out.add_argument("--validation_prompt", type=str, action="append", default=[],
                     help="Prompt for sample images (repeatable): from the embeddings file, or encoded at start "
                          "(the text encoders loaded briefly, then freed).")
    out.add_argument("--validation_steps", type=int, default=0,
                     help="Sample images every N steps (0: only before and after training).")
    out.add_argument("--validation_inference_steps", type=int, default=None,
                     help="Denoising steps of sample images (default 20; with --validation_model, its own).")
    out.add_argument("--validation_guidance_scale", type=float, default=None,
                     help="Guidance of sample images (default 3.5; with --validation_model, its own).")
    out.add_argument("--validation_model", type=str, default=None,
                     help="Draw the sample images on another model of the same family with the LoRA as trained, "
                          "e.g. the distilled FLUX.2 [klein] (black-forest-labs/FLUX.2-klein-4B: 4 steps, no "
                          "guidance) for a LoRA trained on klein base, which is what it will be served on.")
    out.add_argument("--validation_split", type=float, default=0.0,
                     help="Hold this share of the images out of training (at least one) for an eval loss at fixed "
                          "timesteps and noise, every --eval_steps, logged and drawn in loss.png (or give a folder "
                          "of held-out images: --eval_data_dir).")
    out.add_argument("--eval_steps", type=int, default=50, help="Evaluate the held-out images every N steps.")
    out.add_argument("--report_to", type=str, default="tensorboard", choices=["tensorboard", "wandb", "none"],
                     help="Where to log loss, lr, s/step, peak memory and sample images.")
    out.add_argument("--logging_steps", type=int, default=10,
                     help="Read the loss back from the GPU every N steps (each read waits for the GPU).")
    out.add_argument("--profile_dir", type=str, default=None,
                     help="Profile optimizer steps 5-7 (those of them a shorter run has) with torch.profiler: a "
                          "Chrome trace, kernel and CPU tables, with --compile a CUDA memory snapshot "
                          "(pytorch.org/memory_viz) here, and the share of time the GPU was busy in "
                          "train_summary.json.")
    out.add_argument("--export_format", type=str, default=None, choices=["comfyui", "kohya"],
                     help="Also write the LoRA in the kohya/ComfyUI layout (FLUX.1 layer names, fused qkv, .alpha "
                          "tensors) as pytorch_lora_weights_comfyui.safetensors (comfyui and kohya: the same file).")
    out.add_argument("--push_to_hub", action="store_true", help="Upload the LoRA and a model card to the Hub.")
    out.add_argument("--hub_model_id", type=str, default=None, help="Hub repo (default: the output folder's name).")
    out.add_argument("--hub_token", type=str, default=None, help="Hub token (default: your `hf auth login`).")
    out.add_argument("--dry_run", action="store_true",
                     help="Print the memory plan (predicted GPU peak and system RAM) and exit, loading nothing.")
    out.add_argument("--debug", action="store_true", help="Show full tracebacks.")


# The trainer's flags that must lie in a range, with an example of a good value.
AT_LEAST_ONE = ("eval_steps", "rank", "train_batch_size", "gradient_accumulation_steps", "repeats", "num_train_epochs",
                "checkpointing_steps", "logging_steps", "gradient_checkpointing_interval")
OPTIONAL_AT_LEAST_ONE = ("max_train_steps", "validation_inference_steps")  # where given
FRACTIONS = {"caption_dropout": "0.1", "validation_split": "0.1"}  # at least 0 and below 1


def check_ranges(args: argparse.Namespace) -> None:
    """Each value on its own, and the EMA flags together: one line for a bad one (the other cross-flag checks are in
    the trainer's validate_args)."""
    if args.validate_ema and not args.use_ema:
        raise UserError("--validate_ema draws the validation images with the EMA weights: add --use_ema.")
    optional = tuple(name for name in OPTIONAL_AT_LEAST_ONE if getattr(args, name) is not None)
    for name in AT_LEAST_ONE + optional:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 1.")
    for name, example in FRACTIONS.items():
        if not 0 <= getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be at least 0 and below 1 (e.g. {example}).")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UserError(f"--checkpoints_total_limit {args.checkpoints_total_limit} must be at least 1 (leave it out to "
                        "keep every checkpoint).")
    check_optimizer_values(args)
    if args.prior_loss_weight < 0:
        raise UserError(f"--prior_loss_weight {args.prior_loss_weight} must be at least 0 (1.0 as in DreamBooth).")


def check_flag_combinations(args: argparse.Namespace) -> None:
    """The trainer's flags that need another flag, or a library, or exclude each other."""
    if args.push_to_hub and args.hub_token is None:
        from huggingface_hub import get_token

        if get_token() is None:
            raise UserError("--push_to_hub needs a Hub token: run `hf auth login` or pass --hub_token.")
    if args.do_fp8_training and args.base_precision == "nf4" and not args.compile:
        raise UserError("--do_fp8_training on the NF4 base runs in the compiled blocks: add --compile (or "
                        "--base_precision bf16 for torchao's float8 training of a bf16 base).")
    if args.validation_split and args.eval_data_dir:
        raise UserError("give --validation_split (hold out a share of the training images) or --eval_data_dir (a "
                        "folder of held-out images), not both.")
    check_compile_cache_dir(args)
    if args.cuda_graphs and args.offload_activations:
        raise UserError("--cuda_graphs and --offload_activations don't combine (the offload's copies are decided "
                        "on the CPU at every step): drop one.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("To use 8-bit Adam, please install the bitsandbytes library: "
                            "`pip install bitsandbytes`.") from None


def check_optimizer_values(args: argparse.Namespace) -> None:
    """What torch's optimizers would reject mid-setup, and LoRA sizes that can't be meant, refused before anything
    loads."""
    for name, low, high, example in [("learning_rate", 0, None, "1e-4"), ("adam_beta1", 0, 1, "0.9"),
                                     ("adam_beta2", 0, 1, "0.999"), ("adam_epsilon", 0, None, "1e-8"),
                                     ("adam_weight_decay", 0, None, "1e-4"), ("max_grad_norm", 0, None, "1.0")]:
        value = getattr(args, name)
        if not (value >= low and (high is None or value < high)):  # NaN fails too
            limits = f"at least {low}" + (f" and below {high}" if high is not None else "")
            raise UserError(f"--{name} {value} must be {limits} (e.g. {example}).")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise UserError(f"--lora_alpha {args.lora_alpha} must be positive (default: --rank).")


def warn_about_pitfalls(args: argparse.Namespace) -> None:
    """One warning line for each setting that users of Flux trainers report regretting; the run goes on."""
    log = logging.getLogger("train_qlora_flux")
    if args.guidance_scale > 1:
        log.warning("--guidance_scale %g: FLUX.1-dev is guidance-distilled and LoRAs for it usually train at 1.0 (the "
                    "value reaches only models with guidance embeddings).", args.guidance_scale)
    if args.learning_rate == 0:
        log.warning("--learning_rate 0: the LoRA will not change (only the eval loss and samples are computed).")
    if args.learning_rate >= 1e-3:
        log.warning("--learning_rate %g is high for a LoRA (1e-4 is typical): watch for a loss that rises or turns "
                    "NaN.", args.learning_rate)


def timestep_sampling(args: argparse.Namespace) -> flow.TimestepSampling:
    """The flow-matching flags as `flow.TimestepSampling`; a bad --timestep_shift is refused in one line."""
    shift = None
    if args.timestep_shift != "auto":
        try:
            shift = float(args.timestep_shift)
        except ValueError:
            shift = -1.0
        if not shift > 0:
            raise UserError(f"--timestep_shift {args.timestep_shift} must be a positive number or 'auto'.")
    return flow.TimestepSampling(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, shift)

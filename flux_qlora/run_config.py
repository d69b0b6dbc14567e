"""The run's record of its flags: training_config.toml (every flag's value as TOML, with the versions used), which
--config reads back to run the same training again, and what infer.py and the trackers read of it."""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path

CONFIG_NAME = "training_config.toml"
NOT_SAVED = {"config", "hub_token", "debug", "dry_run", "resume_from_checkpoint"}  # secrets and one-off switches

logger = logging.getLogger(__name__)


def recorded_flags(flags: dict) -> dict:
    """The flags a run records (config file, trackers): never the Hub token nor the one-off switches, and no None
    (TOML has no null: such a flag's default is None)."""
    return {key: value for key, value in sorted(flags.items()) if key not in NOT_SAVED and value is not None}


def tracker_config(flags: dict) -> dict:
    """The flags tensorboard/wandb record as the run's config: the plain values of `recorded_flags`."""
    return {k: v for k, v in recorded_flags(flags).items() if isinstance(v, int | float | str | bool)}


# A resume is the same run. The flags that change what a step computes (the maths) must be the checkpoint's: a
# resume given others is refused (checkpoints.check_same_run), since the optimizer and schedule states would keep
# the old values while the data, sizes or LoRA changed under them. Decided from what each flag reaches in the code.
SAME_ON_RESUME = frozenset({
    # the model and what its frozen base computes in
    "pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path", "revision", "variant",
    "base_precision", "do_fp8_training", "mixed_precision",
    # which images and captions train, and how each is made into a sample
    "dataset_name", "dataset_config_name", "dataset_split", "image_column", "caption_column", "instance_prompt",
    "class_prompt", "validation_split", "width", "height", "resolution", "bucket_step", "crop", "random_flip",
    "cache_latents",  # with --crop random: one random place per image instead of one per epoch
    "repeats", "alpha_mask", "caption_dropout", "prior_loss_weight", "seed",
    # the LoRA and its average
    "rank", "lora_alpha", "init_lora_weights", "lora_layers", "use_ema", "ema_decay",
    # the optimizer, its step and its schedule
    "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "use_8bit_adam", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
    # the flow-matching loss
    "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "timestep_shift", "guidance_scale",
})
# Folders of inputs may have moved (another machine, a remounted drive), but whether the flag is given may not: it
# adds a regularisation batch to every step.
SAME_WHETHER_GIVEN = frozenset({"class_data_dir"})
# May change on resume: how long the run is (with a decaying --lr_scheduler the rest of the schedule follows the
# new end), where inputs and outputs are, what is logged, saved, sampled and evaluated, and how fast (the same maths
# at another speed or memory).
MAY_CHANGE_ON_RESUME = frozenset({
    "max_train_steps", "num_train_epochs",
    "instance_data_dir", "data_df_path", "cache_dir", "cache_latents_dir", "output_dir", "eval_data_dir",
    "checkpointing_steps", "checkpoints_total_limit", "overwrite_output_dir", "resume_from_checkpoint",
    "validation_prompt", "validation_steps", "validation_inference_steps", "validation_guidance_scale",
    "validation_model", "validate_ema", "eval_steps", "report_to", "logging_steps", "profile_dir", "export_format",
    "push_to_hub", "hub_model_id", "hub_token", "dry_run", "debug", "config",
    "gradient_checkpointing", "gradient_checkpointing_interval", "offload_activations", "compile",
    "compile_cache_dir", "cuda_graphs", "attention_backend",
})


def resume_differences(recorded: dict, given: dict, defaults: dict) -> list[str]:
    """`flag: checkpoint value -> given value` for each flag of SAME_ON_RESUME (and SAME_WHETHER_GIVEN) where the
    flags `given` now differ from those `recorded` with the checkpoint. A flag the record lacks had its default
    (None is never recorded; a flag added since the checkpoint was written had its default then)."""
    differences = []
    for key in sorted(SAME_ON_RESUME | SAME_WHETHER_GIVEN):
        before, now = recorded.get(key, defaults.get(key)), given.get(key)
        if key in SAME_WHETHER_GIVEN:
            before, now = ("given" if before else "not given"), ("given" if now else "not given")
        if before != now:
            differences.append(f"--{key}: {_shown(before)} -> {_shown(now)}")
    return differences


def _shown(value) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, list) else str(value)


RUN_TABLE = "run"  # what the run found rather than was told: a record, which --config skips


def write_config(flags: dict, path: Path, versions: dict[str, str], found: dict | None = None) -> None:
    """Every flag's value as TOML, with the library versions and git commit as comments: `--config path` runs the
    same training again. `flags`: the parsed flags as the user gave them (what the trainer derives from them is
    derived again the same way); secrets (--hub_token) are never written. `found`: what the run read from its
    inputs (the model family), in a last `[run]` table that --config skips and infer.py reads."""
    lines = [f"# {name} {version}" for name, version in versions.items()]
    lines += [f"{key} = {_toml(value)}" for key, value in recorded_flags(flags).items()]
    if found:
        lines += ["", f"[{RUN_TABLE}]", *(f"{key} = {_toml(value)}" for key, value in found.items())]
    path.write_text("\n".join(lines) + "\n")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def config_beside(lora_file: Path) -> dict | None:
    """The training_config.toml beside a LoRA file, read (None if absent; unreadable: None and a warning, since the
    LoRA itself may still be good, read without its record)."""
    config_file = Path(lora_file).parent / CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        return tomllib.loads(config_file.read_text())
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as error:
        logger.warning("%s is not readable (%s): %s is read without it (the model family and base precision it "
                       "records go unchecked)", config_file, str(error).splitlines()[0][:120], Path(lora_file).name)
        return None


def trained_base_precision(config: dict | None) -> str | None:
    """NF4, bf16 or FP8: the base a LoRA trained on, from its run's config (None without one)."""
    if config is None:
        return None
    return base_precision_label(config.get("base_precision", "nf4"), bool(config.get("do_fp8_training")))


def trained_family(config: dict | None) -> str | None:
    """The model family a LoRA trained on, from its run's config (None without one, or from before families)."""
    return (config or {}).get(RUN_TABLE, {}).get("model_family")


def base_precision_label(base_precision: str, fp8_training: bool) -> str:
    """What the frozen base trained in, as the model card says it and infer.py compares it: NF4, FP8 or bf16."""
    if base_precision == "nf4":
        return "NF4"
    return "FP8" if fp8_training else "bf16"


def run_versions() -> dict[str, str]:
    """The versions a run used: flux-qlora's git commit (when it runs from a checkout) and the key libraries."""
    import importlib.metadata
    import subprocess

    versions = {}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
        versions["flux-qlora"] = commit or "unknown"
    except (OSError, subprocess.SubprocessError):
        versions["flux-qlora"] = "unknown"
    for name in ("torch", "diffusers", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions

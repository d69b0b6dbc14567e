"""The run's record of its flags: training_config.toml (every flag's value as TOML, with the versions used), which
--config reads back to run the same training again, and what infer.py and the trackers read of it."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

CONFIG_NAME = "training_config.toml"
NOT_SAVED = {"config", "hub_token", "debug", "dry_run", "resume_from_checkpoint"}  # secrets and one-off switches


def recorded_flags(flags: dict) -> dict:
    """The flags a run records (config file, trackers): never the Hub token nor the one-off switches, and no None
    (TOML has no null: such a flag's default is None)."""
    return {key: value for key, value in sorted(flags.items()) if key not in NOT_SAVED and value is not None}


def tracker_config(flags: dict) -> dict:
    """The flags tensorboard/wandb record as the run's config: the plain values of `recorded_flags`."""
    return {k: v for k, v in recorded_flags(flags).items() if isinstance(v, int | float | str | bool)}


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
    """The training_config.toml beside a LoRA file, read (None if absent or unreadable)."""
    config_file = Path(lora_file).parent / CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        return tomllib.loads(config_file.read_text())
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
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

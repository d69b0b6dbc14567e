"""Resumable checkpoints: accelerate's state (optimizer, LR scheduler, random states) plus just the LoRA, written
to a hidden temporary folder and renamed when complete, so a crash never leaves a broken one behind."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from flux_qlora.errors import UserError
from flux_qlora.lora import load_lora_into, save_lora

if TYPE_CHECKING:
    from accelerate import Accelerator

    from flux_qlora.step import FlatLora

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def find_checkpoint(resume_from: str, output_dir: str) -> Path | None:
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("No checkpoint in %s yet: starting a new run.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise UserError(f"--resume_from_checkpoint {resume_from} is not a complete checkpoint folder "
                        f"(no {STATE_FILE}); use 'latest' or a {CHECKPOINT_PREFIX}N folder of --output_dir.")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict,
                    total_limit: int | None) -> Path:
    """accelerator.save_state into `.checkpoint-N.tmp`, then an atomic rename to `checkpoint-N`."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "global_step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_training_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def resume(accelerator: Accelerator, resume_from: str | None, output_dir: str) -> dict:
    """Loads the checkpoint `--resume_from_checkpoint` names into the run; its training state ({} for a new run)."""
    checkpoint = find_checkpoint(resume_from, output_dir) if resume_from else None
    if checkpoint is None:
        return {}
    accelerator.load_state(str(checkpoint))
    state = read_training_state(checkpoint)
    logger.info("Resumed from %s at step %d", checkpoint, state["global_step"])
    return state


def register_lora_checkpoint_hooks(accelerator: Accelerator, flat_lora: FlatLora) -> None:
    """Makes every checkpoint folder hold just the LoRA (a loadable `pytorch_lora_weights.safetensors`, fp32)."""

    def save_model_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:
                with flat_lora.master_weights():
                    save_lora(accelerator.unwrap_model(model), output_dir)
            if weights:
                weights.pop()  # so that accelerate doesn't save the whole model (NF4 base included) as well

    def load_model_hook(models, input_dir):
        while models:
            with flat_lora.master_weights():
                load_lora_into(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

"""Resumable checkpoints: accelerate's state (optimizer, LR scheduler, random states) plus just the LoRA, written
to a hidden temporary folder and renamed when complete, so a crash never leaves a broken one behind."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from flux_qlora import run_config
from flux_qlora.errors import Interrupted, UserError
from flux_qlora.files import writes_named
from flux_qlora.lora import LORA_WEIGHT_NAME, load_lora_into, save_lora
from flux_qlora.readers import read_json

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


def prepare_output_dir(output_dir: str | Path, resume_from: str | None, overwrite: bool,
                       checkpoint_bytes: int) -> None:
    """Before anything loads: the folder exists, is writable and has room for a checkpoint (twice: the new one is
    written before the oldest goes); a new run never mixes with another run's checkpoints or overwrites its LoRA."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"--output_dir {folder} can't be written ({error.strerror or error}): give a folder you "
                        "can write to.") from None
    free = shutil.disk_usage(folder).free
    if free < 2 * checkpoint_bytes:
        raise UserError(f"--output_dir {folder}: {free / 2**20:.0f} MiB free, a checkpoint needs about "
                        f"{checkpoint_bytes / 2**20:.0f} MiB (twice that while the next is written): free some space "
                        "or pick another folder.")
    earlier = list_checkpoints(folder) + [f for f in (folder / LORA_WEIGHT_NAME,) if f.exists()]
    if resume_from or not earlier:
        return
    if not overwrite:
        raise UserError(f"--output_dir {folder} already holds another run ({earlier[0].name}): resume it with "
                        "--resume_from_checkpoint latest, start over with --overwrite_output_dir, or pick a new "
                        "--output_dir.")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    logger.info("--overwrite_output_dir: removed the earlier run's %s", ", ".join(p.name for p in earlier))


def check_resume_target(resume_from: str | None, output_dir: str, max_train_steps: int) -> None:
    """Refuses to resume a checkpoint at or past --max_train_steps (that would overwrite the finished LoRA with
    the checkpoint's weights)."""
    checkpoint = find_checkpoint(resume_from, output_dir) if resume_from else None
    if checkpoint is None:
        return
    step = read_training_state(checkpoint)["global_step"]
    if step >= max_train_steps:
        raise UserError(f"{checkpoint} is at step {step}, --max_train_steps is {max_train_steps}: nothing to train "
                        f"(the LoRA in {output_dir} is left as it is); raise --max_train_steps to train on.")


def check_same_run(resume_from: str | None, output_dir: str, flags: dict, defaults: dict,
                   num_processes: int) -> None:
    """A resume is the same run: the flags of run_config.SAME_ON_RESUME must be those the checkpoint recorded, and
    so must the number of processes (the global batch and the sample order depend on it); otherwise one line
    lists each difference. `defaults`: the flags' defaults, for a flag the record lacks."""
    checkpoint = find_checkpoint(resume_from, output_dir) if resume_from else None
    if checkpoint is None:
        return
    state, source = read_training_state(checkpoint), checkpoint / STATE_FILE
    recorded = state.get("config")
    if recorded is None:  # written before checkpoints recorded their flags: the run's file, if any
        source = checkpoint.parent / run_config.CONFIG_NAME
        try:
            recorded = tomllib.loads(source.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            logger.warning("%s records no flags: resuming without checking they are the same.", checkpoint)
            return
    differences = run_config.resume_differences(recorded, flags, defaults)
    if state.get("num_processes", num_processes) != num_processes:
        differences.append(f"processes: {state['num_processes']} -> {num_processes}")
    if differences:
        raise UserError(f"{checkpoint} is of another run: {'; '.join(differences)} (checkpoint -> given). A resume "
                        f"must train the same maths: give the checkpoint's values (recorded in {source}), or start "
                        "a new run in another --output_dir.")


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict,
                    total_limit: int | None) -> Path:
    """accelerator.save_state into `.checkpoint-N.tmp`, then an atomic rename to `checkpoint-N`."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # A failed write (full disk, read-only folder; safetensors' and torch.save's own exception types) is one line;
    # the half-written folder goes, the earlier checkpoints stay.
    try:
        with writes_named(final, "checkpoint", "the earlier checkpoints are left as they were"):
            accelerator.save_state(str(tmp))
            # Each process writes its own random states last, with no barrier after: without this one the main
            # process could rename the folder first, and another's file went to a new .tmp folder (seen once in
            # CI's DDP test).
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (tmp / STATE_FILE).write_text(json.dumps({**state, "global_step": step}))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process and total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_loss_finite(losses: list[float], step: int, output_dir: str) -> None:
    """Stops the run at a NaN/inf loss (read back every --logging_steps), before anything of it is saved."""
    bad = [loss for loss in losses if not math.isfinite(loss)]
    if bad:
        last = list_checkpoints(output_dir)
        raise UserError(f"the loss became {bad[0]} by step {step}: stopped, nothing of it saved (last good checkpoint: "
                        f"{last[-1] if last else 'none'}). Lower --learning_rate, train in bf16 instead of fp16, keep "
                        "--max_grad_norm on, then resume with --resume_from_checkpoint latest.")


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM during training: the first asks the loop to save a checkpoint after the current
    optimizer step and stop with the resume command; a second stops at once. One process stops at the next step;
    several agree at the next loss read-back (every --logging_steps), where the flag rides along with the losses,
    so all of them save the same step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, num_processes: int):
        self.single, self.received = num_processes == 1, None
        in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers need it
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS} if in_main_thread else {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped at once, nothing saved since the "
                                    "last checkpoint (resume it with --resume_from_checkpoint latest)")
        self.received = signal.Signals(signum).name
        logger.warning("%s: saving a checkpoint after this step, then stopping (again: stop at once).", self.received)

    def forces_sync(self) -> bool:
        """Whether this step must read the losses back to stop now: only for one process (the processes of a
        distributed run must all take the same decision, so they wait for the next read-back)."""
        return self.single and self.received is not None

    def with_flag(self, losses: torch.Tensor) -> torch.Tensor:
        """The losses with 1.0 appended if this process got a signal, else 0.0: after the mean over processes, the
        last value is above 0 when any did."""
        return torch.cat([losses, losses.new_tensor([float(self.received is not None)])])

    def stop_here(self, step: int, checkpoint: Path) -> None:
        self.restore()
        command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
        if "--resume_from_checkpoint" not in sys.argv:
            command += " --resume_from_checkpoint latest"
        raise Interrupted(f"{self.received or 'a signal on another process'} at step {step}: saved {checkpoint}. "
                          f"Resume with: {command}")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def read_training_state(checkpoint: Path) -> dict:
    state = read_json(checkpoint / STATE_FILE, f"checkpoint {checkpoint} is damaged:",
                      f"resume from an earlier {CHECKPOINT_PREFIX}N folder, or delete it")
    if not isinstance(state.get("global_step"), int):
        raise UserError(f"checkpoint {checkpoint} is damaged: its {STATE_FILE} has no global_step; resume from an "
                        f"earlier {CHECKPOINT_PREFIX}N folder, or delete it.")
    return state


def resume(accelerator: Accelerator, resume_from: str | None, output_dir: str) -> dict:
    """Loads the checkpoint `--resume_from_checkpoint` names into the run; its training state ({} for a new run)."""
    checkpoint = find_checkpoint(resume_from, output_dir) if resume_from else None
    if checkpoint is None:
        return {}
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, SafetensorError) as error:
        earlier = [p.name for p in list_checkpoints(output_dir) if p != checkpoint]
        raise UserError(f"checkpoint {checkpoint} is damaged ({str(error).splitlines()[0][:160]}): "
                        + (f"resume from {earlier[-1]} instead" if earlier else "start a new --output_dir")
                        + f", or delete {checkpoint.name}.") from None
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

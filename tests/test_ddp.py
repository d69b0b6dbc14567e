"""Data-parallel training through accelerate (DDP, gloo on the CPU): same result as one process, one set of files."""

from __future__ import annotations

import json
import shutil
import socket
import sys

import pytest
from helpers import ROOT, assert_same_lora, run_script, train_args


# The documented multi-GPU config; ACCELERATE_USE_CPU makes accelerate run its processes on the CPU over gloo.
def ddp_launcher() -> list[str]:
    """accelerate launch with 2 processes on a port free right now (a fixed one can still be held by a last run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
            str(ROOT / "accelerate-multigpu.yaml"), "--num_processes", "2", "--main_process_port", str(port),
            "--mixed_precision", "no"]


# On a GPU machine the GPUs are hidden as well: with a GPU in sight, accelerate's barrier asks for CUDA device 1.
CPU = {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
COMMON = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--mixed_precision", "no")


def ddp_args(*flags) -> list:
    """The tiny run's flags with torch's AdamW instead of 8-bit AdamW: 8-bit AdamW's block-wise state quantization
    turns the two ways' fp32 rounding (1e-7: gloo sums the gradients in another order) into flipped quantization
    steps (2.6e-5 in 5 of 256 weights after 4 steps), which say nothing about DDP; resuming 8-bit AdamW is tested in
    one process (test_train.py)."""
    return [flag for flag in train_args(*flags) if flag != "--use_8bit_adam"]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run_script("train_qlora_flux.py", *ddp_args(tiny_model, tiny_images_master, tiny_embeddings, ddp, *COMMON,
                                                  "--train_batch_size", "1", "--report_to", "tensorboard"),
               launcher=ddp_launcher(), env=CPU)
    run_script("train_qlora_flux.py", *ddp_args(tiny_model, tiny_images_master, tiny_embeddings, single, *COMMON,
                                                  "--train_batch_size", "2"), env=CPU)  # the same maths as gloo's
    summary = json.loads((ddp / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert_same_lora(single, ddp, rtol=1e-4, atol=1e-6)
    # Written once, by the main process: one LoRA, one tensorboard log, one set of random states per process.
    assert len(list(ddp.glob("*.safetensors"))) == 1
    assert len(list((ddp / "logs").rglob("events.out.tfevents*"))) == 2  # scalars + hparams, one process
    assert len({p.name.split(".")[3] for p in (ddp / "logs").rglob("events.out.tfevents*")}) == 1
    assert sorted(p.name for p in (ddp / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert not list(ddp.glob(".checkpoint-*"))  # no process wrote into a folder already renamed

    # Resume with two processes from the step-2 checkpoint: the same final LoRA.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ddp / "checkpoint-2", resumed / "checkpoint-2")
    run_script("train_qlora_flux.py", *ddp_args(tiny_model, tiny_images_master, tiny_embeddings, resumed, *COMMON,
                                                  "--train_batch_size", "1", "--resume_from_checkpoint", "latest"),
               launcher=ddp_launcher(), env=CPU)
    assert_same_lora(ddp, resumed, rtol=1e-4, atol=1e-6)

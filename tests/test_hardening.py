"""No silent wrong results, no lost work, no leaked token: the failure modes a user meets without looking for them."""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CPU_ONLY,
    ROOT,
    assert_one_line_error,
    assert_same_lora,
    flag_value,
    run_script,
    script_env,
    stop_stalled,
    train_args,
)
from PIL import Image

from flux_qlora.batches import load_buckets
from flux_qlora.checkpoints import StopSignals
from flux_qlora.cli import describe_out_of_memory, run_main
from flux_qlora.data import image_hash, load_local_samples
from flux_qlora.files import written_atomically
from flux_qlora.reports import write_summary
from flux_qlora.run_config import (
    MAY_CHANGE_ON_RESUME,
    SAME_ON_RESUME,
    SAME_WHETHER_GIVEN,
    recorded_flags,
    resume_differences,
)

TOKEN = "hf_flux_qlora_test_SECRET_4d1c"


# torch's message for a failed CUDA allocation (c10/cuda/CUDACachingAllocator.cpp), without and with a per-process cap
OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.74 GiB of which 1.06 GiB is "
       "free. Including non-PyTorch memory, this process has 13.68 GiB memory in use. {allowed}Of the allocated memory "
       "13.20 GiB is allocated by PyTorch, and 300.11 MiB is reserved by PyTorch but unallocated. If reserved but "
       "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


def test_out_of_gpu_memory_is_one_line_with_the_sizes_and_the_scripts_fix(capsys):
    """The handler every script's main runs under (the real allocation failure: test_infer, on the GPU machine)."""
    free = "2.00 GiB more needed, 1.06 GiB free of 14.74 GiB"
    assert describe_out_of_memory(Exception(OOM.format(allowed=""))) == free
    assert describe_out_of_memory(Exception(OOM.format(allowed="7.50 GiB allowed; "))) == \
        "2.00 GiB more needed, 7.50 GiB allowed to this process"

    def main(args):
        raise torch.OutOfMemoryError(OOM.format(allowed=""))

    with pytest.raises(SystemExit) as stop:
        run_main(main, argparse.Namespace(debug=False), memory_fix="Use less: --gradient_checkpointing.")
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: out of GPU memory ({free}). Use less: --gradient_checkpointing.\n"
    with pytest.raises(torch.OutOfMemoryError):  # --debug: the traceback
        run_main(main, argparse.Namespace(debug=True))


def test_an_interrupted_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    """What every LoRA, parquet, latent and compile-cache write goes through: all or nothing under the name."""
    target = tmp_path / "pytorch_lora_weights.safetensors"
    target.write_bytes(b"the earlier LoRA")
    with pytest.raises(KeyboardInterrupt), written_atomically(target) as partial:
        partial.write_bytes(b"half of the new")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write
    assert target.read_bytes() == b"the earlier LoRA" and list(tmp_path.iterdir()) == [target]
    with written_atomically(target) as partial:
        partial.write_bytes(b"the new LoRA")
    assert target.read_bytes() == b"the new LoRA" and list(tmp_path.iterdir()) == [target]


def test_a_diverging_run_stops_and_saves_no_nan_lora(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    result = run_script("train_qlora_flux.py", *train_args(
        tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out", "--max_train_steps", "6",
        "--learning_rate", "1e9", "--max_grad_norm", "0", "--mixed_precision", "no"), check=False)
    line = assert_one_line_error(result, "the loss became", "Lower --learning_rate", "--resume_from_checkpoint")
    assert "by step" in line
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_run_summary_is_strict_json(tmp_path):
    write_summary(tmp_path / "s.json", {"final_loss": float("nan"), "losses": [1.0, float("inf")], "nested": {"x": 2}})
    text = (tmp_path / "s.json").read_text()
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert summary == {"final_loss": None, "losses": [1.0, None], "nested": {"x": 2}}


def _image_of_every_mode(folder: Path) -> dict[str, Image.Image]:
    """A 16-bit grey, a transparent RGBA (red under the transparency), a palette image with a transparent index."""
    grey16 = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, opaque only in the top half
    rgba[:16, :, 3] = 255
    palette = Image.fromarray(rgba, "RGBA").convert("P")
    images = {"grey16.png": grey16, "rgba.png": Image.fromarray(rgba, "RGBA"), "palette.png": palette}
    for name, image in images.items():
        image.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(name)
    return images


def test_every_image_mode_trains_as_its_pixels_and_hashes_them(tmp_path):
    _image_of_every_mode(tmp_path)
    samples = {Path(s.source).name: s for s in load_local_samples(str(tmp_path), "text", None)}
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # PIL opens it 16-bit
    buckets = load_buckets(list(samples.values()), [[(32, 32)]], check_size=False)
    pixels = {Path(list(samples.values())[int(r)].source).name: cover
              for b in buckets for r, cover in zip(b.rows, b.covers)}
    assert pixels["grey16.png"].float().mean() == pytest.approx(128, abs=1)  # not clipped to white
    assert pixels["rgba.png"][:, 0].tolist() == [[255] * 32, [0] * 32, [0] * 32]  # opaque red stays red
    assert pixels["rgba.png"][:, 31].tolist() == [[255] * 32] * 3  # transparent: the white background, not red
    for name, sample in samples.items():  # the hash is of the pixels that train
        rgb = Image.fromarray(pixels[name].permute(1, 2, 0).numpy())
        assert sample.image_hash == image_hash(rgb), name


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_the_hub_token_reaches_no_file_and_a_failed_upload_is_one_line(tiny_model, tiny_images_master,
                                                                       tiny_embeddings, tmp_path):
    """tensorboard, and an upload to an unreachable Hub: everything stays on disk, the retry command is printed,
    and the token is in no file the run wrote and not in its output."""
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    result = run_script("train_qlora_flux.py", *train_args(
        tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out", "--max_train_steps", "2",
        "--report_to", "tensorboard", "--push_to_hub", "--hub_token", TOKEN, "--hub_model_id", "me/tiny"),
        env=env, check=False)
    line = assert_one_line_error(result, "upload to the Hub failed", "Retry with: hf upload me/tiny")
    assert str(tmp_path / "out") in line
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents*"))
    assert TOKEN not in result.stdout + result.stderr
    assert TOKEN.encode() not in _all_bytes(tmp_path / "out")


def test_the_hub_token_reaches_no_wandb_file(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (not on the GPU machine)")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    (tmp_path / "wandb").mkdir()
    result = run_script("train_qlora_flux.py", *train_args(
        tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out", "--max_train_steps", "2",
        "--report_to", "wandb", "--hub_token", TOKEN), env=env)
    assert list((tmp_path / "wandb").rglob("*.wandb"))  # the run was recorded
    assert TOKEN not in result.stdout + result.stderr
    assert TOKEN.encode() not in _all_bytes(tmp_path / "wandb") + _all_bytes(tmp_path / "out")


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resumes_to_the_uninterrupted_lora(tiny_model, tiny_images_master,
                                                                         tiny_embeddings, tmp_path):
    flags = ["--max_train_steps", "24", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--mixed_precision",
             "no", "--seed", "3"]
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, str(ROOT / "train_qlora_flux.py"),
               *map(str, train_args(tiny_model, tiny_images_master, tiny_embeddings, interrupted, *flags))]
    env = script_env(CPU_ONLY)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint-2").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # after a checkpoint step, mid-run
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "SIGINT at step" in stopped[0] and "--resume_from_checkpoint latest" in stopped[0]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert 2 < step < 24 and (interrupted / f"checkpoint-{step}").is_dir()  # saved where it stopped, not at 2
    assert not (interrupted / "pytorch_lora_weights.safetensors").exists()

    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, interrupted,
                                                  *flags, "--resume_from_checkpoint", "latest"),
               env=CPU_ONLY)
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "full",
                                                  *flags), env=CPU_ONLY)
    assert_same_lora(tmp_path / "full", interrupted)
    losses = [json.loads((run / "train_summary.json").read_text())["losses"] for run in (tmp_path / "full",
                                                                                           interrupted)]
    assert len(losses[1]) == 24 and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(*losses))


def test_a_stalled_script_shows_where_each_thread_waits():
    """SIGUSR1 prints a script's stacks (cli.run_main): what run_script shows of a script that ran out of time,
    e.g. the ranks of a DDP run waiting for each other, before it kills them."""
    code = ("import argparse, time\nfrom flux_qlora.cli import run_main\n"
            "def main(args):\n    print('started', flush=True)\n    time.sleep(60)\n"
            "run_main(main, argparse.Namespace())")
    script = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
    assert script.stdout.readline() == "started\n"
    stop_stalled(script.pid)
    stdout, stderr = script.communicate(timeout=60)
    assert script.returncode == -signal.SIGKILL  # alive after the stacks: killed by the second signal
    # line 4 or 5: the signal may land while print() is still returning
    assert "Current thread" in stderr and re.search(r'File "<string>", line [45] in main', stderr), stderr


# ---------------------------------------------------------------------------------------------------------------
# A resume is the same run: generated over the trainer's flags (run_config's named sets)
# ---------------------------------------------------------------------------------------------------------------

def _trainer_flags() -> tuple[dict[str, argparse.Action], dict, dict]:
    """(the trainer's flags by name, a run's flags as its checkpoint records them, the flags' defaults)."""
    import train_qlora_flux
    from flux_qlora.cli import config_actions

    parser = train_qlora_flux.build_parser()
    given = vars(train_qlora_flux.parse_args(["--data_df_path", "e.parquet", "--instance_data_dir", "images"]))
    return config_actions(parser), recorded_flags(given), train_qlora_flux.flag_defaults()


def _another(action: argparse.Action, value):
    return (not value) if action.nargs == 0 else flag_value(action) if value != flag_value(action) else \
        flag_value(action, 1)


def test_every_trainer_flag_is_either_kept_or_free_on_resume():
    """A new flag must be placed in one of run_config's sets: this fails until it is."""
    actions, _, _ = _trainer_flags()
    named = [SAME_ON_RESUME, SAME_WHETHER_GIVEN, MAY_CHANGE_ON_RESUME]
    assert set().union(*named) == set(actions) | {"config"}
    assert sum(len(group) for group in named) == len(set().union(*named)), "a flag in two sets"


@pytest.mark.parametrize("key", sorted(SAME_ON_RESUME))
def test_a_resume_with_another_maths_flag_names_it_with_both_values(key):
    actions, recorded, defaults = _trainer_flags()
    given = {**recorded, key: _another(actions[key], recorded.get(key, defaults[key]))}
    assert resume_differences(recorded, recorded, defaults) == []
    (line,) = resume_differences(recorded, given, defaults)
    assert line.startswith(f"--{key}: ") and " -> " in line and str(given[key]) in line.split(" -> ")[1]
    older = {k: v for k, v in recorded.items() if k != key}  # a checkpoint from before the flag: its default
    assert resume_differences(older, {**recorded, key: defaults[key]}, defaults) == []
    assert len(resume_differences(older, given, defaults)) == (given[key] != defaults[key])


@pytest.mark.parametrize("key", sorted(MAY_CHANGE_ON_RESUME - {"config"}))
def test_a_resume_may_change_the_free_flags(key):
    actions, recorded, defaults = _trainer_flags()
    assert resume_differences(recorded, {**recorded, key: _another(actions[key], recorded.get(key))}, defaults) == []


def test_a_moved_class_data_dir_resumes_a_dropped_one_does_not():
    _, recorded, defaults = _trainer_flags()
    recorded = {**recorded, "class_data_dir": "/old/place"}
    assert resume_differences(recorded, {**recorded, "class_data_dir": "/new/place"}, defaults) == []
    assert resume_differences(recorded, {**recorded, "class_data_dir": None}, defaults) == \
        ["--class_data_dir: given -> not given"]


def test_a_resume_with_other_maths_is_refused_before_anything_loads(tiny_model, tiny_images_master,
                                                                    tiny_embeddings, tmp_path):
    """A real checkpoint; resumed with another learning rate and width: one line with both differences, and the
    run's training_config.toml still records what trained. A resume with a longer run and other logging goes on,
    and the file records that."""
    out = tmp_path / "out"
    flags = ("--checkpointing_steps", "1", "--learning_rate", "1e-4")
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, out,
                                                  "--max_train_steps", "2", *flags))
    recorded = (out / "training_config.toml").read_text()
    result = run_script("train_qlora_flux.py", *train_args(
        tiny_model, tiny_images_master, tiny_embeddings, out, "--max_train_steps", "3", *flags, "--learning_rate",
        "3e-4", "--resume_from_checkpoint", "latest", size=("--width", "48", "--height", "48")), check=False)
    line = assert_one_line_error(result, "checkpoint-1 is of another run", "--learning_rate: 0.0001 -> 0.0003",
                                 "--width: 64 -> 48", "start a new run")
    assert "--height" not in line and "--max_train_steps" not in line
    assert (out / "training_config.toml").read_text() == recorded
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, out,
                                                  "--max_train_steps", "3", *flags, "--logging_steps", "2",
                                                  "--resume_from_checkpoint", "latest"))
    config = tomllib.loads((out / "training_config.toml").read_text())
    assert config["max_train_steps"] == 3 and config["logging_steps"] == 2 and config["learning_rate"] == 1e-4


def test_a_second_ctrl_c_stops_at_once_with_a_stopped_line_that_says_so(capsys):
    """The handler the training loop runs under (StopSignals), in-process: the first signal asks for a checkpoint,
    the second stops at once, and run_main's `stopped:` line says what happened, never nothing."""
    def main(args):
        signals = StopSignals(num_processes=1)
        try:
            signals._handle(signal.SIGINT, None)
            assert signals.received == "SIGINT" and signals.forces_sync()
            signals._handle(signal.SIGINT, None)  # raises
        finally:
            signals.restore()

    for body, expect in [(main, "stopped: SIGINT again: stopped at once, nothing saved since the last checkpoint "
                                "(resume it with --resume_from_checkpoint latest)"),
                         (lambda args: (_ for _ in ()).throw(KeyboardInterrupt),  # Ctrl-C outside the loop
                          "stopped: interrupted; nothing saved since the last checkpoint")]:
        with pytest.raises(SystemExit) as stop:
            run_main(body, argparse.Namespace(debug=False))
        assert stop.value.code == 130
        assert capsys.readouterr().err == expect + "\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers restored


@pytest.mark.parametrize("decay", ["0", "1", "-0.5", "1.5", "nan", "inf", "abc"])
def test_an_ema_decay_outside_0_1_is_refused_when_parsed(decay, tmp_path, capsys):
    """On the command line and in a --config file: one line, exit code 2, before anything else runs."""
    import train_qlora_flux

    (tmp_path / "c.toml").write_text(f"ema_decay = {decay if decay != 'abc' else repr(decay)}\n")
    for flags in (["--ema_decay", decay], ["--config", str(tmp_path / "c.toml")]):
        with pytest.raises(SystemExit) as stop:
            train_qlora_flux.parse_args(["--data_df_path", "e.parquet", *flags])
        (line,) = capsys.readouterr().err.splitlines()
        assert stop.value.code == 2 and line.startswith("error: ") and "--ema_decay" in line, line
        assert "above 0 and below 1" in line or "not a number" in line, line
    assert train_qlora_flux.parse_args(["--data_df_path", "e.parquet", "--ema_decay", "0.9"]).ema_decay == 0.9

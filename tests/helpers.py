"""What the test files share: running the scripts as a user would, their flags for a tiny run, the golden losses, and
the assertions on what a run wrote or printed. The fixtures (the tiny model, images, embeddings) are in conftest.py.
pyproject.toml's `pythonpath = ["tests"]` makes this module importable as `helpers`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(ROOT / "accelerate.yaml")]
VALIDATION = "a red circle on a green background"  # embedded by the tiny_embeddings fixture
# The first six losses of the tiny model, seed 0, fp32 on the CPU, lr 1e-3: a change to the data order, noise,
# timesteps, loss, LoRA init or optimizer shows up here even when the loss still falls. Re-pinned when every random
# stream came to be drawn through flux_qlora/seeds.py (the earlier values, measured at 5d4eaac, came back to 3e-7
# with the old seed formulas put back in the refactored trainer: nothing else changed).
GOLDEN_LOSSES = [1.2106900215148926, 1.3793882131576538, 1.0648043155670166, 1.5148416757583618, 1.356829285621643,
                 1.169012427330017]
GOLDEN_FLAGS = ("--max_train_steps", "6", "--mixed_precision", "no", "--learning_rate", "1e-3", "--checkpointing_steps",
                "1000")
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # the golden losses are the CPU's, also on a GPU machine
# conftest's resumed_run: bf16 (the LoRA computes in a bf16 copy while its fp32 master weights, saved in the checkpoint,
# are trained), 2 micro steps a step, a cosine schedule, the LoRA's EMA; a checkpoint at step 3.
RESUMED_FLAGS = ("--max_train_steps", "6", "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2",
                 "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--logging_steps", "4", "--mixed_precision",
                 "bf16", "--use_ema", "--ema_decay", "0.7")


def script_env(extra: dict | None = None) -> dict:
    """The environment a script runs in: this process's, offline, with `extra` on top."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **(extra or {})}


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)`'s result, built once per test run: under pytest-xdist the first worker builds it and the
    others wait for it and read it (each worker building its own cost ~1 min apiece on a 14-worker GPU run). The
    results are read-only for the tests, as a session fixture's always were. Also for a module's fixture that tests
    on several workers use (a module fixture is otherwise built by each worker that runs one of them)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / "built-once" / name  # the run's folder, shared by its workers
    folder.parent.mkdir(exist_ok=True)
    with FileLock(f"{folder}.lock"):
        done = folder.with_suffix(".done")
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died half-way
            folder.mkdir()
            done.write_text(str(build(folder)))
        return Path(done.read_text())


def train_args(model, images, embeddings, output_dir, *extra, size=("--width", "64", "--height", "48"),
               cache_latents: bool = True) -> list:
    """train_qlora_flux.py's flags for a run on the tiny model: NF4, 8-bit AdamW, checkpointing, cached latents."""
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", images, "--data_df_path", embeddings,
            "--output_dir", output_dir, *size, *(["--cache_latents"] if cache_latents else []), "--use_8bit_adam",
            "--gradient_checkpointing", "--report_to", "none", "--logging_steps", "1", *extra]


def flag_value(action: argparse.Action, nth: int = 0):
    """A value of the flag's type and choices that is not its default (the `nth` such): what the tests generated
    over every flag of a parser give it."""
    if action.choices is not None:
        others = [c for c in action.choices if c not in (action.default, action.const)]
        return others[nth % len(others)] if others else list(action.choices)[nth % len(action.choices)]
    if action.type is int:
        return (action.default if isinstance(action.default, int) else 0) + 3 + nth
    if action.type is float:
        return 0.375 + nth
    if action.type in (str, None):
        return f"value {nth} of {action.dest}"
    candidates = [text for text in ("0.375", "0.625", "3", "4", "text") if _parses(action.type, text)]
    return action.type(candidates[nth % len(candidates)])  # a type of its own (a range): what it takes


def _parses(type_, text: str) -> bool:
    try:
        type_(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False
    return True


def tiny_forward(transformer, grad: bool = False, device: str = "cpu") -> torch.Tensor:
    """The tiny transformer on fixed random inputs (12 image tokens, 5 text tokens)."""
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 12, 16, generator=g), timestep=torch.tensor([0.7]),
                  guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=g), txt_ids=torch.zeros(5, 3),
                  img_ids=torch.randn(12, 3, generator=g))
    with torch.set_grad_enabled(grad):
        return transformer(**{k: v.to(device) for k, v in inputs.items()}, return_dict=False)[0]


def run_script(script: str, *args, check: bool = True, launcher: list[str] | None = None,
               env: dict | None = None, timeout: float = 480) -> subprocess.CompletedProcess:
    """Runs one of the project's scripts as a user would; `check` fails the test with its output if it fails.

    Where it can, in a fork of a warm Python (tests/warm_python.py: the same process start, less the imports)."""
    target = script if script.startswith("-") else str(ROOT / script)  # "-m" runs a module: args[0] names it
    command = [*(launcher or [sys.executable]), target, *map(str, args)]
    full_env = script_env(env)
    warm = launcher is None and not script.startswith("-") and WarmPython.serves(full_env)
    run = WarmPython.get().run if warm else run_command
    # A hang (e.g. a distributed run waiting for a dead peer) fails the test with its output, not CI's clock.
    returncode, stdout, stderr, stalled = run(command, full_env, timeout)
    if stalled:
        raise AssertionError(f"{script} ran out of its {timeout} s; where each process was:\n{stderr[-12000:]}\n"
                             f"{stdout[-2000:]}")
    result = subprocess.CompletedProcess(command, returncode, stdout, stderr)
    if check and result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        raise AssertionError(f"{script} failed ({result.returncode}):\n{output}")
    return result


def run_command(command: list[str], env: dict, timeout: float) -> tuple[int, str, str, bool]:
    """(returncode, stdout, stderr, stalled) of `command` in a new process."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr, False
    except subprocess.TimeoutExpired:
        stop_stalled(process.pid)
        stdout, stderr = process.communicate(timeout=60)
        return process.returncode, stdout, stderr, True


class WarmPython:
    """This test process's tests/warm_python.py server, started at its first use, stopped by `stop()` (conftest's
    pytest_sessionfinish), which also removes its folder."""

    _server: WarmPython | None = None
    # Read when the script runs, not at import: a run may set them differently from the server's environment. And
    # pytest's PYTEST_CURRENT_TEST, which names each test's setup, call and teardown: compared, it turned away every
    # run but those of the test phase that started the server (they started cold: ~9 s to the first step, not ~1 s).
    LATE_READ = ("CUDA_VISIBLE_DEVICES", "WANDB_", "PYTEST_CURRENT_TEST")

    def __init__(self, env: dict):
        self.env = env
        self.folder = Path(tempfile.mkdtemp(prefix="warm-python-"))
        self.log = open(self.folder / "server.log", "w")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "warm_python.py")], cwd=ROOT, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, stderr=self.log)

    @classmethod
    def serves(cls, env: dict) -> bool:
        """Linux without CUDA (the fork must not inherit a CUDA context), and no variable that an import reads set
        otherwise than in the server; FLUX_QLORA_WARM_PYTHON=0 turns it off."""
        if sys.platform != "linux" or torch.cuda.is_available() or os.environ.get("FLUX_QLORA_WARM_PYTHON") == "0":
            return False
        server_env = cls._server.env if cls._server else script_env()
        differ = {key for key in server_env.keys() | env.keys() if server_env.get(key) != env.get(key)}
        return all(key.startswith(cls.LATE_READ) for key in differ)

    @classmethod
    def get(cls) -> WarmPython:
        if cls._server is None or cls._server.process.poll() is not None:
            cls.stop()  # one that ended: its folder goes too
            cls._server = cls(script_env())
        return cls._server

    @classmethod
    def stop(cls) -> None:
        """Ends the server (end of its input), then removes its folder: the log and the last run's output."""
        server, cls._server = cls._server, None
        if server is None:
            return
        server.process.stdin.close()
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
        server.process.stdout.close()
        server.log.close()
        shutil.rmtree(server.folder, ignore_errors=True)

    def run(self, command: list[str], env: dict, timeout: float) -> tuple[int, str, str, bool]:
        stdout, stderr = self.folder / "stdout", self.folder / "stderr"
        request = {"script": command[1], "argv": command[2:], "env": env, "cwd": str(ROOT), "stdout": str(stdout),
                   "stderr": str(stderr)}
        print(json.dumps(request), file=self.process.stdin, flush=True)
        started = self._reply(timeout=600)  # after the imports, at the first run
        if started is None:
            raise AssertionError(f"the warm Python did not start: {(self.folder / 'server.log').read_text()[-3000:]}")
        pid = started["pid"]
        reply = self._reply(timeout)
        stalled = reply is None
        if stalled:
            stop_stalled(pid)
            reply = self._reply(timeout=60) or {"returncode": None}  # killed: the server reports it at once
        return reply["returncode"], stdout.read_text(), stderr.read_text(), stalled

    def _reply(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the warm Python ended: {(self.folder / 'server.log').read_text()[-3000:]}")
        return json.loads(line)


def stop_stalled(pid: int) -> None:
    """Has each process under `pid` (e.g. each rank of a DDP run) print its threads' stacks (SIGUSR1, which
    cli.run_main registers; a launcher without it just ends), then kills them all."""
    import psutil

    try:
        family = [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]
    except psutil.NoSuchProcess:  # it ended just now
        family = []
    for signal_number in (signal.SIGUSR1, signal.SIGKILL):
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal_number)
        time.sleep(3 if signal_number == signal.SIGUSR1 else 0)


def assert_same_lora(expected: Path, actual: Path, name: str = "pytorch_lora_weights.safetensors",
                     rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Two runs saved the same LoRA (file `name` in each output folder): the same keys, the same values."""
    from safetensors.torch import load_file

    first, second = load_file(expected / name), load_file(actual / name)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=rtol, atol=atol)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The script failed with one `error: ...` line naming the fragments, and no traceback."""
    assert result.returncode == 2, f"exit code {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_refused(check: Callable[[], object], *fragments: str) -> str:
    """`check()` (a script's validate_args, in-process) raised a UserError whose message names the fragments on one
    line: the `error: ...` line run_main prints for it."""
    from flux_qlora.errors import UserError

    with pytest.raises(UserError) as error:
        check()
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message

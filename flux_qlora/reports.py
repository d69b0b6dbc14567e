"""What a run leaves behind for people: the step profile, peak memory, the loss plot, the run summary, the model
card and the upload to the Hub."""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux_qlora.compile_cache import compile_cache_bypasses, compile_cache_hits
from flux_qlora.errors import UserError

logger = logging.getLogger(__name__)


def peak_memory_gib(device: torch.device, reserved: bool = False) -> float:
    """Peak GPU memory held by tensors (allocated) or by PyTorch's caching allocator (reserved); 0 on the CPU."""
    if device.type != "cuda":
        return 0.0
    return (torch.cuda.max_memory_reserved(device) if reserved else torch.cuda.max_memory_allocated(device)) / 2**30


def allocated_gib(device: torch.device) -> float:
    """GPU memory held by tensors now; 0 on the CPU (also a CPU run on a machine with a GPU)."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def kernel_seconds(prof) -> float:
    """GPU kernel time of a torch.profiler run, in seconds. Kernels only: operator rows and user annotations
    (e.g. "Optimizer.step") repeat their kernels' time."""
    return sum(e.device_time_total for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1e6


def write_profile_tables(prof, folder: Path, prefix: str = "", rows: int = 40) -> None:
    """The top kernels and the top CPU operators of a torch.profiler run, as text tables."""
    table = prof.key_averages().table
    (folder / f"{prefix}top_kernels.txt").write_text(table(sort_by="self_cuda_time_total", row_limit=rows))
    (folder / f"{prefix}top_cpu.txt").write_text(table(sort_by="self_cpu_time_total", row_limit=rows))


class StepProfiler:
    """Profiles optimizer steps 5-7 (after warm-up and compilation): a Chrome trace, kernel and CPU tables, a CUDA
    memory snapshot (with `record_memory`), and the GPU's kernel time per step, which the run summary divides by the
    median (unprofiled) step time to say how busy the GPU was. With no folder (no --profile_dir) it does nothing."""

    first, last = 5, 7

    def __init__(self, folder: str | None, device: torch.device, record_memory: bool = True):
        self.folder, self.device, self.kernel_s_per_step = folder and Path(folder), device, None
        self.record_memory = record_memory and device.type == "cuda"
        self.profile = None

    def profiling(self, step: int) -> bool:
        return self.folder is not None and self.first <= step <= self.last

    def after_step(self, step: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self.folder is None:
            return
        if step == self.first - 1:
            self.profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.profile.__enter__()
            if self.record_memory:  # every allocation with its stack, for pytorch.org/memory_viz
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        elif step == self.last:
            self._stop(steps=self.last - self.first + 1)

    def close(self, step: int) -> None:
        """Ends a profile the run stopped inside (fewer than 7 steps, or an error), writing the steps it recorded:
        left running, the profiler crashed the interpreter at exit (segfault after a 5-step run's summary)."""
        self._stop(steps=step - self.first + 1)

    def _stop(self, steps: int) -> None:
        profile, self.profile = self.profile, None
        if profile is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        profile.__exit__(None, None, None)
        if steps < 1:  # it started after the run's last step: nothing of a step in it
            if self.record_memory:
                torch.cuda.memory._record_memory_history(enabled=None)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.record_memory:
            torch.cuda.memory._dump_snapshot(str(self.folder / "memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.kernel_s_per_step = kernel_seconds(profile) / steps
        profile.export_chrome_trace(str(self.folder / "trace.json"))
        write_profile_tables(profile, self.folder)
        logger.info("Profiled steps %d-%d: %.3f s of GPU kernels per step (trace in %s)", self.first,
                    self.first + steps - 1, self.kernel_s_per_step, self.folder)


def launch_seconds(device: torch.device) -> float:
    """Seconds since this process started, the GPU's queued work done (this syncs: for start-up moments only). The
    imports count, as they count in a user's wait for the first step."""
    import psutil

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round(time.time() - psutil.Process().create_time(), 2)


class Startup(dict):
    """`launch_seconds()` at each start-up moment of a run (main_started, images_indexed, vae_loaded, data_loaded,
    model_loaded, first_step): where the wait for the first step goes."""

    def mark(self, moment: str, device: torch.device) -> float:
        self[moment] = launch_seconds(device)
        return self[moment]


class StepClock:
    """Seconds per optimizer step; steps the profiler is recording stay out (its overhead is not the step's)."""

    def __init__(self):
        self.tick, self.last = time.perf_counter(), 0.0

    def lap(self) -> float:
        now = time.perf_counter()
        self.last, self.tick = now - self.tick, now
        return self.last


class CompileCounter:
    """Counts torch.compile's graph compilations during micro steps, and those made at a training size that had
    already been stepped (recompiles: with buckets each size should compile once, on its first step)."""

    def __init__(self):
        self.sizes_seen: set[tuple[int, ...]] = set()
        self.compiles = self.recompiles = 0

    @staticmethod
    def graphs_compiled() -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    @contextmanager
    def micro_step(self, size: tuple[int, ...]):
        before = self.graphs_compiled()
        yield
        new = self.graphs_compiled() - before
        self.compiles += new
        self.recompiles += new if size in self.sizes_seen else 0
        self.sizes_seen.add(size)


@dataclass
class RunStats:
    """What a training run measured: every optimizer step's loss (from the start of the run, resumed ones too),
    the step times, the GPU kernel time per step (with --profile_dir) and the GPU memory the model took."""

    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    kernel_s_per_step: float | None = None
    model_gib: float = 0.0
    predicted_peak_gib: float | None = None  # the memory plan's
    eval_losses: list[list[float]] = field(default_factory=list)  # [step, held-out loss] (--validation_split)
    skipped_steps: int = 0  # fp16 steps skipped by loss scaling (inf/NaN gradients)
    compiles: CompileCounter = field(default_factory=CompileCounter)
    cuda_graphs_captured: int = 0  # one per training size with --cuda_graphs
    startup: Startup = field(default_factory=Startup)

    def median_s_per_step(self) -> float | None:
        times = sorted(self.step_times[1:] or self.step_times)  # the first step includes warm-up
        return times[len(times) // 2] if times else None

    def summary(self, device: torch.device) -> dict:
        median, kernel_s, losses = self.median_s_per_step(), self.kernel_s_per_step, self.losses
        return {
            "resumed_from_step": self.start_step, "median_s_per_step": median,
            "peak_gpu_memory_gib": round(peak_memory_gib(device), 3),
            "peak_reserved_gpu_memory_gib": round(peak_memory_gib(device, reserved=True), 3),
            "predicted_peak_gpu_memory_gib": self.predicted_peak_gib and round(self.predicted_peak_gib, 3),
            "model_gpu_memory_gib": round(self.model_gib, 3), "gpu_kernel_s_per_step": kernel_s,
            "skipped_steps": self.skipped_steps, "training_sizes": len(self.compiles.sizes_seen),
            "graphs_compiled": self.compiles.compiles, "recompiles": self.compiles.recompiles,
            "cuda_graphs_captured": self.cuda_graphs_captured, "compile_cache_hits": compile_cache_hits(),
            "compile_cache_bypasses": compile_cache_bypasses(),
            "seconds_since_launch": self.startup,
            "gpu_busy_percent": round(100 * kernel_s / median, 1) if kernel_s and median else None,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "first_loss": losses[0] if losses else None, "eval_losses": self.eval_losses,
        }


def plot_loss(losses: list[float], path: Path, eval_losses: list[list[float]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if len(losses) >= 2 * window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(range(window, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window}")
    if eval_losses:
        steps, values = zip(*eval_losses)
        ax.plot(steps, values, "o-", lw=1.5, label="held-out (fixed timesteps and noise)")
    ax.set(xlabel="optimizer step", ylabel="flow-matching loss", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(path: Path, summary: dict) -> None:
    """Strict JSON: a NaN or inf (which json.dumps writes bare, and JSON doesn't have) is written as null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, list | tuple) else value

    path.write_text(json.dumps(finite(summary), indent=2, allow_nan=False) + "\n")


@dataclass
class ModelCard:
    """What the Hub model card says about a trained LoRA: trigger, base model, settings, samples, and how to load it
    in diffusers and in ComfyUI."""

    base_model: str
    repo_id: str  # where users load it from: the Hub repo, or the output folder
    title: str
    rank: int
    alpha: int
    layers: str
    steps: int
    sizes: str  # "512x768", or the buckets' resolutions: "buckets of ~512x512, ~1024x1024 pixels"
    base_precision: str  # what the base was trained in: NF4, bf16, FP8
    instance_prompt: str | None = None
    validation_prompts: list[str] = field(default_factory=list)
    sample_files: list[str] = field(default_factory=list)
    comfyui_file: str | None = None  # the kohya/ComfyUI-layout copy (--export_format), if written
    family_label: str = "FLUX.1"  # the model family, as people name it
    pipeline_class: str = "FluxPipeline"  # the diffusers pipeline that loads the base and the LoRA
    inference_steps: int = 28

    def render(self) -> str:
        widgets = "\n".join(f"- text: {json.dumps(p)}\n  output:\n    url: {f}"
                            for p, f in zip(self.validation_prompts, self.sample_files))
        trigger = f"\nTrigger / instance prompt: `{self.instance_prompt}`\n" if self.instance_prompt else ""
        example = (self.validation_prompts or [self.instance_prompt or "a photo"])[0]
        samples = "".join(f"\n![{p}]({f})" for p, f in zip(self.validation_prompts, self.sample_files))
        comfy = (f"`{self.comfyui_file}` (kohya/ComfyUI layout)" if self.comfyui_file else
                 "the file converted by `python -m flux_qlora.convert pytorch_lora_weights.safetensors "
                 "my-lora-comfyui.safetensors --to comfyui`")
        return f"""---
base_model: {self.base_model}
library_name: diffusers
license: other
tags:
- flux
{"- flux2" + chr(10) if self.family_label.startswith("FLUX.2") else ""}- lora
- qlora
- flux-qlora
- text-to-image
{"widget:" + chr(10) + widgets if widgets else ""}
---

# {self.title}

A {self.family_label} LoRA for [{self.base_model}](https://huggingface.co/{self.base_model}), trained with
flux-qlora on a {self.base_precision} base: rank {self.rank}, alpha {self.alpha} (folded into the weights: every
loader applies the same strength), layers `{self.layers}`, {self.steps} steps at {self.sizes}.
{trigger}{samples}

## diffusers

```python
import torch
from diffusers import {self.pipeline_class}

pipe = {self.pipeline_class}.from_pretrained("{self.base_model}", dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{self.repo_id}")
image = pipe("{example}", num_inference_steps={self.inference_steps}).images[0]
```

## ComfyUI

Put {comfy} in `ComfyUI/models/loras/`, then add a *LoraLoaderModelOnly* node after the {self.family_label} model
loader at strength 1.0 (the same strength as in diffusers).
"""


NOT_UPLOADED = ("checkpoint-*", ".checkpoint-*", "logs/*")


def push_to_hub(output_dir: str, repo_name: str, token: str | None) -> str:
    """Uploads the output folder (no checkpoints, no logs) to the Hub repo `repo_name`; returns its id."""
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(repo_name, exist_ok=True, token=token).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir, token=token, commit_message="flux-qlora LoRA",
                      ignore_patterns=list(NOT_UPLOADED))
    except Exception as error:  # network, auth, quota: the run's work is on disk, only the upload is left
        retry = f"hf upload {repo_name} {output_dir} . " + " ".join(f"--exclude '{p}'" for p in NOT_UPLOADED)
        reason = str(error).replace(token, "***") if token else str(error)
        raise UserError(f"the upload to the Hub failed ({type(error).__name__}: {reason.splitlines()[0][:160]}); "
                        f"everything is saved in {output_dir}. Retry with: {retry}") from None
    logger.info("Pushed to https://huggingface.co/%s", repo_id)
    return repo_id

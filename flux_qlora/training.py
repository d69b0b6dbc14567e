"""Training pieces that are not the loop itself: the data in memory, the sample order, checkpoints, reports."""

from __future__ import annotations

import json
import logging
import os
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flux_qlora.data import Sample, UserError, resize_and_crop
from flux_qlora.embeddings import TextEmbeddings

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"


# ---------------------------------------------------------------------------------------------------------------
# Data in memory: one row per unique image, text embeddings and latents (or pixels) in the same order
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    keys: list[str]
    prompt_embeds: torch.Tensor  # (N, seq, dim)
    pooled_prompt_embeds: torch.Tensor  # (N, pooled_dim)
    text_ids: torch.Tensor  # (seq, 3)
    images: torch.Tensor  # (N, 3, H, W) uint8 pixels, or (N, C, h, w) scaled latents once cached
    validation: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # prompt -> embeddings
    latents_cached: bool = False

    def __len__(self) -> int:
        return len(self.keys)


def match_embeddings(samples: list[Sample], embeddings: TextEmbeddings, data_df_path: str) -> TextEmbeddings:
    """The embeddings of exactly these samples, in their order; refuses images the parquet doesn't know."""
    index = embeddings.index()
    missing = [s for s in samples if s.image_hash not in index]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(samples)} images have no embeddings in {data_df_path} (e.g. {missing[0].source}): "
            "the images or captions changed since it was made; re-run compute_embeddings.py with the same data flags."
        )
    rows = torch.tensor([index[s.image_hash] for s in samples])
    stale = [s.source for s, r in zip(samples, rows.tolist()) if embeddings.captions[r] not in ("", s.caption)]
    if stale:
        raise UserError(f"{len(stale)} caption(s) changed since {data_df_path} was made (e.g. {stale[0]}); "
                        "re-run compute_embeddings.py to update it.")
    return TextEmbeddings(
        keys=[s.image_hash for s in samples], captions=[s.caption for s in samples],
        prompt_embeds=embeddings.prompt_embeds[rows], pooled_prompt_embeds=embeddings.pooled_prompt_embeds[rows],
        text_ids=embeddings.text_ids, manifest=embeddings.manifest,
    )


def load_pixels(samples: list[Sample], width: int, height: int) -> torch.Tensor:
    pixels = [resize_and_crop(s.open_image(), width, height) for s in tqdm(samples, desc="Loading images", leave=False)]
    return torch.stack(pixels)


def to_model_input(pixels: torch.Tensor, device, dtype) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> VAE input in [-1, 1]."""
    return (pixels.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0).contiguous()


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 4, show_progress: bool = True) -> torch.Tensor:
    """Scaled latents ((mean - shift) * scale) of uint8 pixels; the mean, not a sample, so caches are exact."""
    device, dtype = vae.device, vae.dtype
    chunks = []
    for start in tqdm(range(0, len(pixels), batch_size), desc="Caching latents", disable=not show_progress):
        dist = vae.encode(to_model_input(pixels[start : start + batch_size], device, dtype)).latent_dist
        chunks.append(((dist.mean - vae.config.shift_factor) * vae.config.scaling_factor).to(dtype))
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------------------------
# Sample order and noise: pure functions of (seed, micro step), so a resumed run repeats the same run exactly
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    num_images: int
    repeats: int
    batch_size: int  # per process
    num_processes: int
    seed: int
    _perms: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def micro_steps_per_epoch(self) -> int:
        return (self.num_images * self.repeats) // self.global_batch

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.num_images * self.repeats, generator=generator)}
        return self._perms[epoch]

    def rows(self, micro_step: int, rank: int) -> torch.Tensor:
        """Image rows of this process's part of the global batch: no image twice per epoch, none dropped by rank."""
        epoch, i = divmod(micro_step, self.micro_steps_per_epoch)
        batch = self._perm(epoch)[i * self.global_batch : (i + 1) * self.global_batch]
        return batch[rank * self.batch_size : (rank + 1) * self.batch_size] % self.num_images

    def generator(self, micro_step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + micro_step + 1)


# ---------------------------------------------------------------------------------------------------------------
# Activation offloading: what autograd keeps for the backward (with checkpointing: each block's inputs) waits
# in pinned CPU memory instead of on the GPU
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Offloaded:
    host: torch.Tensor
    ready: torch.cuda.Event | None = None  # the copy in either direction is done
    fetched: torch.Tensor | None = None  # prefetched back to the GPU


class ActivationOffload:
    """saved_tensors_hooks that copy large saved tensors to pinned CPU memory on a side stream during the forward
    and bring them back during the backward, each one prefetched while the block after it is being processed
    (the backward visits blocks in reverse order). Weights, small and non-contiguous tensors stay where they are.

        offload = ActivationOffload(device)
        with offload.hooks(model):
            loss = model(...)
        loss.backward()
    """

    def __init__(self, device: torch.device, min_bytes: int = 1 << 20):
        self.device, self.min_bytes = device, min_bytes
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.entries: list[_Offloaded] = []
        self.seen: dict[int, tuple[weakref.ref, int]] = {}
        self.keep: set[int] = set()

    def hooks(self, model: torch.nn.Module):
        self.entries, self.seen = [], {}
        if not self.keep:  # the weights' storages don't move during training: listed once, not every step
            self.keep = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if (tensor.device.type != self.device.type or not tensor.is_contiguous()
                or tensor.numel() * tensor.element_size() < self.min_bytes
                or tensor.untyped_storage().data_ptr() in self.keep):
            return tensor
        # A tensor saved by several ops (e.g. the rotary embedding, by every block) is copied once; the weak
        # reference tells a live tensor from a new one at a recycled id.
        ref, index = self.seen.get(id(tensor), (None, None))
        if ref is None or ref() is not tensor:
            index = len(self.entries)
            self.entries.append(self._to_host(tensor))
            self.seen[id(tensor)] = (weakref.ref(tensor), index)
        return index

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        tensor = self._fetch(packed)
        if packed > 0:
            self._fetch(packed - 1, prefetch=True)
        return tensor

    def _to_host(self, tensor: torch.Tensor) -> _Offloaded:
        if self.stream is None:
            return _Offloaded(tensor.clone())
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # not reused by the allocator before the copy is done
        return _Offloaded(host, self.stream.record_event())

    def _fetch(self, index: int, prefetch: bool = False) -> torch.Tensor | None:
        entry = self.entries[index]
        if self.stream is None:
            return None if prefetch else entry.host
        if entry.fetched is None:
            with torch.cuda.stream(self.stream):
                entry.fetched = entry.host.to(self.device, non_blocking=True)
                entry.ready = self.stream.record_event()
        if prefetch:
            return None
        tensor, entry.fetched = entry.fetched, None
        current = torch.cuda.current_stream(self.device)
        current.wait_event(entry.ready)
        tensor.record_stream(current)
        return tensor


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs: a micro step (forward, backward, gradient gather) captured once and replayed, so the CPU no longer
# launches its thousands of kernels one by one
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a hidden temporary folder, renamed when complete, so a crash never leaves a broken one
# ---------------------------------------------------------------------------------------------------------------


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


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, total_limit: int | None) -> Path:
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


# ---------------------------------------------------------------------------------------------------------------
# What a run leaves behind for people: a loss plot, sample images, a summary
# ---------------------------------------------------------------------------------------------------------------


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if len(losses) >= 2 * window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(range(window, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="optimizer step", ylabel="flow-matching loss", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def model_card(args, sample_files: list[str]) -> str:
    widgets = "\n".join(f"- text: {json.dumps(p)}\n  output:\n    url: {f}"
                        for p, f in zip(args.validation_prompt or [], sample_files))
    trigger = f"\nTrigger / instance prompt: `{args.instance_prompt}`\n" if args.instance_prompt else ""
    return f"""---
base_model: {args.pretrained_model_name_or_path}
library_name: diffusers
license: other
tags:
- flux
- lora
- qlora
- flux-qlora
- text-to-image
{"widget:" + chr(10) + widgets if widgets else ""}
---

# {args.hub_model_id or Path(args.output_dir).name}

A LoRA for [{args.pretrained_model_name_or_path}](https://huggingface.co/{args.pretrained_model_name_or_path}),
trained with flux-qlora (NF4 base, rank {args.rank}, alpha {args.lora_alpha or args.rank},
layers `{args.lora_layers}`, {args.max_train_steps} steps at {args.width}x{args.height}).
{trigger}
```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained("{args.pretrained_model_name_or_path}", dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{args.hub_model_id or args.output_dir}")
image = pipe("{(args.validation_prompt or [args.instance_prompt or 'a photo'])[0]}", num_inference_steps=28).images[0]
```
"""

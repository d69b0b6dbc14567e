"""The training data in memory and the order it is visited in.

One row per unique image: its text embeddings, and its pixels or (with --cache_latents) its VAE latents, in the
same order. The sample order and the noise are pure functions of (seed, micro step), so a resumed run repeats the
uninterrupted run exactly, and every process of a data-parallel run draws its part of one global batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from flux_qlora.data import Sample, resize_and_crop
from flux_qlora.embeddings import TextEmbeddings

logger = logging.getLogger(__name__)


@dataclass
class TrainData:
    keys: list[str]  # image hashes
    prompt_embeds: torch.Tensor  # (N, seq, dim)
    pooled_prompt_embeds: torch.Tensor  # (N, pooled_dim)
    text_ids: torch.Tensor  # (seq, 3)
    pixels: torch.Tensor | None  # (N, 3, H, W) uint8; dropped once the latents are cached
    latents: torch.Tensor | None = None  # (N, C, h, w) scaled latents, with --cache_latents
    validation: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # prompt -> embeddings

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, embeddings: TextEmbeddings, pixels: torch.Tensor,
              validation: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> TrainData:
        """`embeddings` row i belongs to `pixels[i]` (see `embeddings.match_embeddings`)."""
        return cls(keys=embeddings.keys, prompt_embeds=embeddings.prompt_embeds.to(dtype),
                   pooled_prompt_embeds=embeddings.pooled_prompt_embeds.to(dtype),
                   text_ids=embeddings.text_ids.to(dtype), pixels=pixels, validation=validation)

    def cache_latents(self, vae, show_progress: bool = True) -> None:
        """Encodes every image once (kept on the CPU); the pixels are dropped."""
        self.latents = encode_latents(vae, self.pixels, show_progress=show_progress).cpu()
        self.pixels = None


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


@dataclass
class Batch:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor


def get_batch(data: TrainData, rows: torch.Tensor, vae, device: torch.device) -> Batch:
    """The rows' latents (cached, or encoded now) and embeddings on `device`."""
    if data.latents is not None:
        latents = data.latents[rows].to(device, data.prompt_embeds.dtype)
    else:
        latents = encode_latents(vae, data.pixels[rows], show_progress=False)
    return Batch(latents, data.prompt_embeds[rows].to(device, non_blocking=True),
                 data.pooled_prompt_embeds[rows].to(device, non_blocking=True))


@dataclass
class SampleOrder:
    """Which images each process trains on at each micro step: a fresh permutation of the repeated images every
    epoch, split into global batches, each split by rank."""

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
        """The micro step's own generator, for its noise and timesteps."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + micro_step + 1)

    def rank_slice(self, rank: int) -> slice:
        """This process's share of a tensor drawn for the whole global batch."""
        return slice(rank * self.batch_size, (rank + 1) * self.batch_size)

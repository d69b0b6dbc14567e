"""The training data in memory and the order it is visited in.

Every image trains at one size per resolution: its aspect-ratio bucket (`flux_qlora/buckets.py`), or the one
--width x --height. The items of a bucket (an image at that bucket's size) are kept scaled to cover the bucket and
cropped when a batch is made, or (with --cache_latents) encoded by the VAE once. Every batch comes from one bucket.

The sample order, the crops and flips, and the noise are pure functions of (seed, micro step / image, epoch), each
drawn from its own stream (`flux_qlora/seeds.py`), so a resumed run repeats the uninterrupted run exactly, and
every process of a data-parallel run draws its part of one global batch. Each micro step draws one batch from each
`ImageSet` (the training images, and the regularisation images of --class_data_dir) as named `StepInputs`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from flux_qlora import families, seeds
from flux_qlora.buckets import Size, check_not_too_elongated, check_not_too_small, nearest_bucket
from flux_qlora.data import Sample, crop, open_mask, resize_to_cover
from flux_qlora.embeddings import TextEmbeddings
from flux_qlora.errors import UserError
from flux_qlora.flow import TimestepSampling, draw_noise_and_sigmas
from flux_qlora.latent_cache import LatentCache, LatentFiles, mask_digest

logger = logging.getLogger(__name__)


@dataclass
class Augment:
    """Per-item crops and flips: `crop` "center" or "random", `random_flip` mirrors half the items each epoch."""

    crop: str = "center"
    random_flip: bool = False
    seed: int = 0
    stream: str = "train"  # the image set's name: its own random stream

    def draw(self, item: int, epoch: int, extra_w: int, extra_h: int) -> tuple[int, int, bool]:
        """(left, top, flip) of item `item` in `epoch`, for a cover image `extra_w` x `extra_h` larger than its size."""
        if self.crop == "center" and not self.random_flip:
            return extra_w // 2, extra_h // 2, False
        generator = seeds.generator(self.seed, f"{self.stream}/augment", item, epoch)
        flip = bool(torch.rand((), generator=generator) < 0.5) and self.random_flip
        if self.crop == "center":
            return extra_w // 2, extra_h // 2, flip
        left, top = (int(torch.randint(0, extra + 1, (), generator=generator)) for extra in (extra_w, extra_h))
        return left, top, flip

    def without_flips(self) -> Augment:
        """The same crops, never mirrored: what cached latents are encoded from (the mirror is encoded beside)."""
        return Augment(self.crop, False, self.seed, self.stream)


@dataclass
class Bucket:
    """The items of one training size: their embedding rows, their cover images (until the latents are cached) and
    their latents (with --random_flip the mirrored items' latents follow, at position + len(rows))."""

    size: Size
    rows: torch.Tensor  # (n,) rows of the embeddings
    first_item: int  # global index of its first item, for the per-item randomness
    covers: list[torch.Tensor] | None  # (3, H, W) uint8, each covering `size`
    latents: torch.Tensor | LatentFiles | None = None  # (n or 2n, C, h, w) scaled latents, or their files
    mask_covers: list[torch.Tensor | None] | None = None  # with loss masks: (1, H, W) uint8 each, None = no mask
    latent_masks: torch.Tensor | LatentFiles | None = None  # (n or 2n, 1, h, w) in [0, 1], beside cached latents

    def __len__(self) -> int:
        return len(self.rows)

    def crops(self, positions: torch.Tensor, epoch: int, augment: Augment) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, 3, height, width) pixels of the items at `positions`, cropped (and flipped) as in `epoch`, and
        their masks (B, 1, height, width) cropped alike (None without loss masks)."""
        width, height = self.size
        pixels, masks = [], []
        for position in positions.tolist():
            cover = self.covers[position]
            left, top, flip = augment.draw(self.first_item + position, epoch, cover.shape[2] - width,
                                           cover.shape[1] - height)
            pixels.append(crop(cover, width, height, left, top, flip))
            if self.mask_covers is not None:
                mask = self.mask_covers[position]
                whole = torch.full((1, height, width), 255, dtype=torch.uint8)
                masks.append(whole if mask is None else crop(mask, width, height, left, top, flip))
        return torch.stack(pixels), torch.stack(masks) if masks else None

    def cache_latents(self, vae, augment: Augment, show_progress: bool) -> None:
        """Encodes every item once, cropped as in epoch 0 (the VAE doesn't run again, so a random crop stays the one
        drawn for the item); with --random_flip the mirrored items too. The cover images are dropped."""
        pixels, masks = self.crops(torch.arange(len(self)), 0, augment.without_flips())
        if augment.random_flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            masks = None if masks is None else torch.cat([masks, masks.flip(-1)])
        self.latents = check_latents_finite(encode_latents(vae, pixels, show_progress=show_progress).cpu(), self.size)
        self.latent_masks = None if masks is None else on_latent_grid(masks, self.latents)
        self.covers = self.mask_covers = None

    def cache_latents_on_disk(self, vae, augment: Augment, cache: LatentCache, image_hashes: list[str],
                              show_progress: bool) -> int:
        """As `cache_latents`, into one file per item in `cache` (`flux_qlora/latent_cache.py`), encoding only the
        items whose file is missing; training then reads them per batch. Returns how many were encoded."""
        fixed = augment.without_flips()  # the crop cache_latents draws: epoch 0, no flip
        width, height = self.size
        files = []
        for position, row in enumerate(self.rows.tolist()):
            cover = self.covers[position]
            left, top, _ = fixed.draw(self.first_item + position, 0, cover.shape[2] - width, cover.shape[1] - height)
            mask = None if self.mask_covers is None else self.mask_covers[position]
            digest = mask_digest(self.mask_covers is not None, mask)
            files.append(cache.file(image_hashes[row], self.size, (left, top), augment.random_flip, digest))
        kinds = ["latents"] + (["mask"] if self.mask_covers is not None else [])  # what each file holds
        names = kinds + ([f"{kind}_flipped" for kind in kinds] if augment.random_flip else [])
        missing = [position for position, file in enumerate(files) if not cache.reusable(file, names)]
        # One item per VAE call: a file's latents then don't depend on which other items were missing with it
        # (convolutions sum in another order at another batch size).
        for position in tqdm(missing, desc="Caching latents", disable=not (show_progress and missing)):
            pixels, masks = self.crops(torch.tensor([position]), 0, fixed)
            encoded = {"latents": encode_latents(vae, pixels, show_progress=False).cpu()}
            if augment.random_flip:
                encoded["latents_flipped"] = encode_latents(vae, pixels.flip(-1), show_progress=False).cpu()
            for latents in encoded.values():  # the in-memory cache's check, on both orientations
                check_latents_finite(latents, self.size)
            if masks is not None:
                encoded["mask"] = on_latent_grid(masks, encoded["latents"])
                if augment.random_flip:
                    encoded["mask_flipped"] = on_latent_grid(masks.flip(-1), encoded["latents"])
            cache.write(files[position], {name: tensor[0] for name, tensor in encoded.items()})
        self.latents = LatentFiles(files, "latents")
        self.latent_masks = None if self.mask_covers is None else LatentFiles(files, "mask")
        self.covers = self.mask_covers = None
        return len(missing)


def check_latents_finite(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Latents to cache must be finite: an fp16 VAE overflows on some images, and NaN latents train a NaN LoRA."""
    if not bool(torch.isfinite(latents).all()):
        raise UserError(f"the VAE gave NaN/inf latents for images of the {size[0]}x{size[1]} size: train with "
                        "--mixed_precision bf16 or no (the VAE overflows in fp16), or check those images.")
    return latents


def on_latent_grid(masks: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """uint8 masks (B, 1, H, W) -> the share of each latent pixel's patch that counts, (B, 1, h, w) in [0, 1]."""
    factor = masks.shape[-1] // latents.shape[-1]  # the VAE's downsampling: 8
    return torch.nn.functional.avg_pool2d(masks.float() / 255, factor).to(latents.device, latents.dtype)


@dataclass
class TrainData:
    keys: list[str]  # image hashes, one per embeddings row
    prompt_embeds: torch.Tensor  # (N, seq, dim)
    pooled_prompt_embeds: torch.Tensor  # (N, pooled_dim)
    text_ids: torch.Tensor  # (seq, 3)
    buckets: list[Bucket]
    augment: Augment = field(default_factory=Augment)
    empty_caption: tuple[torch.Tensor, torch.Tensor] | None = None  # what --caption_dropout trains on

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_masks(self) -> bool:
        return any(b.mask_covers is not None or b.latent_masks is not None for b in self.buckets)

    @property
    def num_items(self) -> int:
        return sum(len(b) for b in self.buckets)

    @classmethod
    def build(cls, embeddings: TextEmbeddings, buckets: list[Bucket], dtype: torch.dtype, augment: Augment,
              empty_caption: tuple[torch.Tensor, torch.Tensor] | None = None) -> TrainData:
        """`embeddings` row i belongs to `samples[i]` (see `embeddings.match_embeddings`)."""
        empty = None if empty_caption is None else tuple(t.to(dtype) for t in empty_caption)
        return cls(keys=embeddings.keys, prompt_embeds=embeddings.prompt_embeds.to(dtype),
                   pooled_prompt_embeds=embeddings.pooled_prompt_embeds.to(dtype),
                   text_ids=embeddings.text_ids.to(dtype), buckets=buckets, augment=augment, empty_caption=empty)

    def cache_latents(self, vae, show_progress: bool = True, cache: LatentCache | None = None) -> int:
        """Every bucket's latents, in memory or (with `cache`) on disk; returns how many items were encoded."""
        encoded = 0
        for bucket in self.buckets:
            if cache is None:
                bucket.cache_latents(vae, self.augment, show_progress)
                encoded += len(bucket)
            else:
                encoded += bucket.cache_latents_on_disk(vae, self.augment, cache, self.keys, show_progress)
        return encoded


def load_buckets(samples: list[Sample], sizes: list[list[Size]], check_size: bool,
                 alpha_mask: bool = False, rows: list[int] | None = None, what: str = "images",
                 alpha_required: bool = False) -> list[Bucket]:
    """Each image (those of `rows`, default all) at the nearest size of each list of `sizes` (one list per
    resolution; one size for --width x --height), scaled to cover it, with its loss mask (NAME_mask.png, or with
    `alpha_mask` its alpha channel) if any image has one; the items grouped by size, in a fixed order.
    `check_size`: refuse images that would be upscaled more than 2x (buckets). Masks that leave nothing to train
    (`check_masks`) are refused or warned about, naming the set as `what`; `alpha_required`: refuse a set without
    any alpha channel (--alpha_mask would do nothing)."""
    by_size: dict[Size, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
    any_mask, black, with_alpha = False, [], 0
    rows = range(len(samples)) if rows is None else rows
    for row in tqdm(rows, desc="Loading images", leave=False):
        sample = samples[row]
        image = sample.open_image()
        mask = open_mask(sample, image, alpha_mask)
        any_mask |= mask is not None
        with_alpha += "A" in image.getbands()
        if mask is not None and mask.convert("L").getextrema()[1] == 0:
            black.append(sample.source)
        for options in sizes:
            size = nearest_bucket(image.width, image.height, options)
            if check_size:
                check_not_too_small(image.width, image.height, size, sample.source)
            check_not_too_elongated(image.width, image.height, size, sample.source)
            mask_cover = None if mask is None else resize_to_cover(mask, *size, mode="L")
            by_size.setdefault(size, []).append((row, resize_to_cover(image, *size), mask_cover))
    check_masks(len(rows), black, what, alpha_mask)
    if alpha_required and rows and not with_alpha:
        raise UserError(f"--alpha_mask: none of the {len(rows)} {what} has an alpha channel (transparency), so no "
                        "loss mask comes from it: drop --alpha_mask, or give images with transparency (RGBA PNG); a "
                        "NAME_mask.png beside an image is its mask without the flag.")
    buckets, first = [], 0
    for size in sorted(by_size, key=lambda s: (s[0] / s[1], s[0])):
        rows, covers, masks = zip(*by_size[size])
        buckets.append(Bucket(size, torch.tensor(rows), first, list(covers), mask_covers=list(masks) if any_mask
                              else None))
        first += len(rows)
    return buckets


def check_masks(count: int, black: list[str], what: str, alpha_mask: bool) -> None:
    """All-black loss masks train nothing: refused when every one of the `count` images has one (`black`: their
    sources), a warning with the count when some do."""
    if not black:
        return
    fix = "white is where the loss counts" + (" (with --alpha_mask: opaque)" if alpha_mask else "")
    if len(black) == count:
        raise UserError(f"all {count} {what} have an all-black loss mask (e.g. {black[0]}): nothing would train; "
                        f"{fix}: fix the masks or remove them.")
    logger.warning("%d of %d %s have an all-black loss mask (e.g. %s): they train nothing; %s.", len(black), count,
                   what, black[0], fix)


def to_model_input(pixels: torch.Tensor, device, dtype) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> VAE input in [-1, 1]."""
    return (pixels.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0).contiguous()


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 1, show_progress: bool = True) -> torch.Tensor:
    """Normalized latents (FLUX.1: (mean - shift) * scale; FLUX.2: by the VAE's BatchNorm statistics) of uint8
    pixels; the mean, not a sample, so caches are exact. One image at a time: the encoder's full-resolution
    activations are ~1.5 GiB per 1024x1024 image (four at once peaked at 6.24 GiB on an H100, above FLUX.2 [klein]
    4B's whole training step), and one image already fills the GPU."""
    device, dtype, family = vae.device, vae.dtype, families.for_vae(vae)
    chunks = []
    for start in tqdm(range(0, len(pixels), batch_size), desc="Caching latents", disable=not show_progress):
        dist = vae.encode(to_model_input(pixels[start : start + batch_size], device, dtype)).latent_dist
        chunks.append(family.normalize_latents(vae, dist.mean).to(dtype))
    return torch.cat(chunks)


@dataclass
class Batch:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    mask: torch.Tensor | None = None  # (B, 1, h, w) loss weights on the latent grid


def get_batch(data: TrainData, bucket_index: int, positions: torch.Tensor, epoch: int, vae, device: torch.device,
              dropped: torch.Tensor | None = None) -> Batch:
    """The items' latents (cached, or encoded now from this epoch's crops) and embeddings on `device`; the
    `dropped` ones get the empty caption's embeddings (--caption_dropout)."""
    bucket = data.buckets[bucket_index]
    if bucket.latents is not None:
        if data.augment.random_flip:
            flips = [data.augment.draw(bucket.first_item + p, epoch, 0, 0)[2] for p in positions.tolist()]
            positions = positions + len(bucket) * torch.tensor(flips, dtype=positions.dtype)
        latents = bucket.latents[positions].to(device, data.prompt_embeds.dtype)
        mask = None if bucket.latent_masks is None else bucket.latent_masks[positions].to(device, latents.dtype)
    else:
        pixels, masks = bucket.crops(positions, epoch, data.augment)
        latents = encode_latents(vae, pixels, show_progress=False)
        mask = None if masks is None else on_latent_grid(masks, latents)
    rows = bucket.rows[positions % len(bucket)]
    prompt_embeds, pooled = data.prompt_embeds[rows], data.pooled_prompt_embeds[rows]
    if dropped is not None and bool(dropped.any()):
        prompt_embeds[dropped], pooled[dropped] = data.empty_caption  # copies (advanced indexing): data unchanged
    return Batch(latents, prompt_embeds.to(device, non_blocking=True), pooled.to(device, non_blocking=True), mask)


class StepInputs(NamedTuple):
    """One image set's tensors for one micro step, on the device. Flat (`flat()`, the masks left out where there are
    none) for the CUDA graph, which takes a fixed list of tensors; named everywhere else."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    mask: torch.Tensor | None = None  # (B, 1, h, w) loss weights on the latent grid

    @property
    def batch(self) -> Batch:
        return Batch(self.latents, self.prompt_embeds, self.pooled_prompt_embeds, self.mask)

    def flat(self) -> list[torch.Tensor]:
        return [tensor for tensor in self if tensor is not None]

    @classmethod
    def unflatten(cls, flat: tuple[torch.Tensor, ...], has_masks: list[bool]) -> list[StepInputs]:
        """The inverse of `flat()` over several sets, given which of them carry masks."""
        inputs, start = [], 0
        for has_mask in has_masks:
            width = len(cls._fields) - (not has_mask)
            inputs.append(cls(*flat[start : start + width]))
            start += width
        return inputs


@dataclass
class ImageSet:
    """Images each micro step draws one batch from: the training images, or the regularisation images of
    --class_data_dir (their loss weighted by --prior_loss_weight, never caption-dropped)."""

    data: TrainData
    order: SampleOrder
    loss_weight: float = 1.0
    caption_dropout: float = 0.0

    def draw(self, micro_index: int, rank: int, vae, device: torch.device, sampling: TimestepSampling) -> StepInputs:
        """This process's batch at this micro step, with its noise and sigmas."""
        order = self.order
        bucket, positions = order.batch(micro_index, rank)
        batch = get_batch(self.data, bucket, positions, order.epoch(micro_index), vae, device,
                          order.dropped(micro_index, rank, self.caption_dropout))
        noise, sigmas = draw_noise_and_sigmas(sampling, order.generator(micro_index), order.global_batch,
                                              order.rank_slice(rank), tuple(batch.latents.shape[1:]))
        return StepInputs(batch.latents, batch.prompt_embeds, batch.pooled_prompt_embeds,
                          noise.to(device, non_blocking=True), sigmas.to(device, non_blocking=True), batch.mask)


def held_out_rows(samples: list[Sample], share: float) -> list[int]:
    """The rows of about `share` of the images (at least one), held out for the eval loss: the ones with the lowest
    image hashes, so the choice is fixed for a dataset and independent of file names and order."""
    if share <= 0:
        return []
    if len(samples) < 2:
        raise UserError(f"--validation_split {share} of {len(samples)} image(s) holds out none: one must stay to "
                        "train (with 2 images or more any split above 0 holds out at least one); add images, or "
                        "give held-out images with --eval_data_dir instead.")
    count = min(len(samples) - 1, max(1, round(share * len(samples))))
    return sorted(sorted(range(len(samples)), key=lambda row: samples[row].image_hash)[:count])


@dataclass
class SampleOrder:
    """Which items each process trains on at each micro step. Every epoch each bucket's items (repeated) are
    permuted and cut into global batches (a remainder smaller than a batch is left out that epoch), the batches
    of all buckets are shuffled together, and each is split by rank: every batch comes from one bucket."""

    bucket_sizes: list[int]  # items per bucket
    repeats: int
    batch_size: int  # per process
    num_processes: int
    seed: int
    stream: str = "train"  # the image set's name: its own random streams
    _epochs: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def micro_steps_per_epoch(self) -> int:
        return sum((n * self.repeats) // self.global_batch for n in self.bucket_sizes)

    def _batches(self, epoch: int) -> list[tuple[int, torch.Tensor]]:
        if epoch not in self._epochs:
            batches = []
            for b, n in enumerate(self.bucket_sizes):
                generator = seeds.generator(self.seed, f"{self.stream}/order", epoch, b)
                perm = torch.randperm(n * self.repeats, generator=generator)
                batches += [(b, perm[i * self.global_batch : (i + 1) * self.global_batch] % n)
                            for i in range(len(perm) // self.global_batch)]
            if len(self.bucket_sizes) > 1:
                generator = seeds.generator(self.seed, f"{self.stream}/bucket-shuffle", epoch)
                batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
            self._epochs = {epoch: batches}
        return self._epochs[epoch]

    def epoch(self, micro_step: int) -> int:
        return micro_step // self.micro_steps_per_epoch

    def batch(self, micro_step: int, rank: int) -> tuple[int, torch.Tensor]:
        """(bucket, item positions in it) of this process's part of the global batch: no item twice per epoch,
        none dropped by rank."""
        epoch, i = divmod(micro_step, self.micro_steps_per_epoch)
        bucket, positions = self._batches(epoch)[i]
        return bucket, positions[self.rank_slice(rank)]

    def dropped(self, micro_step: int, rank: int, probability: float) -> torch.Tensor:
        """Which of this process's items train on the empty caption (--caption_dropout), drawn for the global batch
        from a stream of its own, so the noise and timesteps stay as they are without dropout."""
        generator = seeds.generator(self.seed, f"{self.stream}/dropout", micro_step)
        return (torch.rand(self.global_batch, generator=generator) < probability)[self.rank_slice(rank)]

    def generator(self, micro_step: int) -> torch.Generator:
        """The micro step's own generator, for its noise and timesteps."""
        return seeds.generator(self.seed, f"{self.stream}/noise", micro_step)

    def rank_slice(self, rank: int) -> slice:
        """This process's share of a tensor drawn for the whole global batch."""
        return slice(rank * self.batch_size, (rank + 1) * self.batch_size)

"""Latents cached on disk (--cache_latents_dir): one small safetensors file per item, named by the sha256 of
everything its latents depend on (the image's pixels, its training size and crop, its mask, the VAE, the dtype).

A later run reuses every file whose inputs are unchanged and encodes only the rest, and it can never read a stale
entry: a changed input is another name. Files are written atomically (a temporary name, then a rename), so an
interrupted encoding resumes where it stopped. Training reads each batch's files when it needs them, so large sets
stay on disk instead of in RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from flux_qlora.errors import UserError
from flux_qlora.files import written_atomically
from flux_qlora.readers import check_finite, open_safetensors, read_json, read_safetensors

logger = logging.getLogger(__name__)

LAYOUT_VERSION = 1
# A cache entry that goes bad after it was checked (another program, a failing disk): what to do about it.
FIX = "delete it (or the --cache_latents_dir folder) and run again: it is encoded anew"


def vae_fingerprint(name_or_path: str, revision: str | None, variant: str | None) -> dict:
    """What identifies the VAE: its Hub id and revision, or for a local folder also its weight files' sizes and
    modification times (so re-saved weights are new weights)."""
    folder = Path(name_or_path) / "vae"
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return {"model": name_or_path, "revision": revision, "variant": variant,
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


class LatentCache:
    """A folder of cached latents for one VAE and dtype."""

    def __init__(self, folder: str | Path, vae: dict, dtype: torch.dtype):
        self.folder, self.vae, self.dtype = Path(folder), vae, dtype
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            version = read_json(manifest, "--cache_latents_dir manifest", "give another folder or delete it"
                                ).get("layout_version")
            if version != LAYOUT_VERSION:
                raise UserError(f"--cache_latents_dir {self.folder} was written in another layout ({version}): "
                                "give another folder or delete it.")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            manifest.write_text(json.dumps({"layout_version": LAYOUT_VERSION, "entry": "sha256 of the item's inputs"
                                            " -> latents[, latents_flipped, mask, mask_flipped]"}, indent=2))

    def file(self, image_hash: str, size: tuple[int, int], crop: tuple[int, int], flips: bool,
             mask: str | None) -> Path:
        """The file of one item's latents: a name made of all its inputs (`mask`: see `mask_digest`)."""
        inputs = {"image": image_hash, "size": list(size), "crop": list(crop), "flips": flips, "vae": self.vae,
                  "dtype": str(self.dtype), "mask": mask}
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def reusable(self, file: Path, names: list[str]) -> bool:
        """Whether an entry can be reused as it is: the file exists, reads, holds `names` and they are finite. A
        damaged entry (a disk that filled, a copy cut short, NaN written by another program) is logged and
        encoded again, never trained on."""
        if not file.exists():
            return False
        try:
            read_safetensors(file, "cached latents", FIX, names=names, finite=True)
        except UserError as error:
            logger.warning("%s; encoding it again.", str(error).removesuffix(f": {FIX}."))
            return False
        return True

    @staticmethod
    def write(file: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        file.parent.mkdir(exist_ok=True)
        with written_atomically(file) as partial:  # several processes may write the same file
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))


class LatentFiles:
    """A bucket's cached latents (or masks) read from their files per batch: indexable like the in-memory tensor,
    positions n and above being the mirrored items (--random_flip)."""

    def __init__(self, files: list[Path], name: str):
        self.files, self.name = files, name

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, positions: torch.Tensor) -> torch.Tensor:
        n = len(self.files)
        return torch.stack([self._read(self.files[p % n], self.name + ("_flipped" if p >= n else ""))
                            for p in positions.tolist()])

    @staticmethod
    def _read(file: Path, name: str) -> torch.Tensor:
        """Just the one tensor (a file holds the latents, their mirror and the masks: reading all of them for each
        was 4x the bytes with masks and flips)."""
        with open_safetensors(file, "cached latents", FIX) as f:
            tensor = f.get_tensor(name)
        check_finite({name: tensor}, file, "cached latents", FIX)
        return tensor


def mask_digest(masks_on: bool, mask: torch.Tensor | None) -> str | None:
    """The mask's part of an item's inputs: None without loss masks, "whole" for an item without a mask of its own
    (its file then holds a mask of ones), else the hash of its mask."""
    if not masks_on:
        return None
    return "whole" if mask is None else hashlib.sha256(mask.numpy().tobytes()).hexdigest()

"""Validation images during training: drawn by the training transformer itself (no second copy of the model; with
--validation_model, by that model's transformer carrying the LoRA, loaded for the samples only), with the cached
prompt embeddings, the VAE on the GPU only to decode."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flux_qlora.families import Family

logger = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]]  # prompt -> (prompt_embeds, pooled_prompt_embeds)
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    negative: tuple[torch.Tensor, torch.Tensor] | None = None  # the empty prompt's, for classifier-free guidance
    model: str | None = None  # another model of the family to draw on (--validation_model), with the LoRA
    distilled: bool = False  # that model is step-distilled: no classifier-free guidance
    hub: dict = field(default_factory=dict)  # its revision, variant, cache_dir


@torch.no_grad()
def sample_images(accelerator, family: Family, transformer, vae, scheduler, settings: SampleSettings,
                  output_dir: Path, step: int, vae_home: str | torch.device) -> list[str]:
    """Writes `samples/step-<step>-<i>.png` for each prompt (also to the trackers) and returns their paths relative
    to `output_dir`. The VAE goes back to `vae_home` afterwards (the CPU when latents are cached)."""
    trained = accelerator.unwrap_model(transformer)
    with lora_on_other_model(settings, trained, vae.dtype, accelerator.device) as model:
        return draw_samples(accelerator, family, model, vae, scheduler, settings, output_dir, step, vae_home)


@contextmanager
def lora_on_other_model(settings: SampleSettings, trained: nn.Module, dtype: torch.dtype,
                        device: torch.device) -> Iterator[nn.Module]:
    """The training transformer itself, or (--validation_model) that model's transformer in NF4 with the LoRA's
    current weights, loaded for these samples and freed after them (~2 GiB for FLUX.2 [klein] 4B)."""
    if settings.model is None:
        yield trained
        return
    from peft.utils import set_peft_model_state_dict

    from flux_qlora.lora import lora_state_dict
    from flux_qlora.models import load_transformer

    other = load_transformer(settings.model, device, dtype, **settings.hub)
    other.add_adapter(trained.peft_config["default"])
    set_peft_model_state_dict(other, lora_state_dict(trained), adapter_name="default")
    try:
        yield other
    finally:
        del other
        if device.type == "cuda":
            torch.cuda.empty_cache()


def draw_samples(accelerator, family: Family, model: nn.Module, vae, scheduler, settings: SampleSettings,
                 output_dir: Path, step: int, vae_home: str | torch.device) -> list[str]:
    vae.to(accelerator.device)
    pipe = family.sample_pipeline(model, vae, scheduler, settings.distilled)
    pipe.set_progress_bar_config(disable=True)
    (output_dir / "samples").mkdir(exist_ok=True)
    was_training = model.training
    model.eval()
    files = []
    with accelerator.autocast():
        for i, (prompt, (prompt_embeds, pooled)) in enumerate(settings.prompts.items()):
            inputs = family.sample_kwargs(prompt_embeds, pooled, settings.negative)
            image = pipe(**{k: v.to(accelerator.device, vae.dtype) for k, v in inputs.items()},
                         width=settings.width, height=settings.height, num_inference_steps=settings.steps,
                         guidance_scale=settings.guidance_scale,
                         generator=torch.Generator("cpu").manual_seed(settings.seed)).images[0]
            files.append(f"samples/step-{step:06d}-{i}.png")
            image.save(output_dir / files[-1])
            log_image(accelerator.trackers, prompt, image, step, i)
    model.train(was_training)
    vae.to(vae_home)
    logger.info("Sample images for step %d in %s", step, output_dir / "samples")
    return files


def log_image(trackers, prompt: str, image, step: int, index: int) -> None:
    """A sample image to each of accelerate's trackers (tensorboard, wandb)."""
    import numpy as np

    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(f"samples/{index}", np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({f"samples/{index}": wandb.Image(image, caption=prompt)}, step=step)

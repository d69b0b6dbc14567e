"""Validation images during training: drawn by the training transformer itself (no second copy of the model), with
the cached prompt embeddings, the VAE on the GPU only to decode."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flux_qlora.reports import log_image

logger = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]]  # prompt -> (prompt_embeds, pooled_prompt_embeds)
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int


TEXT_ENCODERS_GIB = 12.0  # T5-XXL + CLIP in bf16 (~9.8 GB) with room for the encoding: below this, on the CPU


@torch.no_grad()
def validation_embeddings(table, prompts: list[str], model: str, device: torch.device,
                          **hub_kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """prompt -> (prompt_embeds, pooled) for each validation prompt: from the embeddings file, or, for prompts
    compute_embeddings.py didn't embed, encoded here with the text encoders at the file's sequence length, on a GPU
    with room (else on the CPU, in bf16: half of fp32's RAM) and freed before the transformer loads, the GPU's peak
    memory statistics reset so that the run reports its training peak."""
    from flux_qlora.embeddings import prompt_key
    from flux_qlora.models import load_text_pipeline

    index = table.index()
    missing = [p for p in dict.fromkeys(prompts) if prompt_key(p) not in index]
    embeddings = {p: table.prompt(p) for p in prompts if p not in missing}
    if not missing:
        return embeddings
    on_gpu = device.type == "cuda" and torch.cuda.mem_get_info(device)[0] / 2**30 >= TEXT_ENCODERS_GIB
    where = str(device) if on_gpu else "cpu"
    pipe = load_text_pipeline(model, where, dtype=None if on_gpu else torch.bfloat16, **hub_kwargs)
    prompt_embeds, pooled, _ = pipe.encode_prompt(missing, prompt_2=None,
                                                  max_sequence_length=table.prompt_embeds.shape[1])  # one pass
    for i, prompt in enumerate(missing):
        embeddings[prompt] = (prompt_embeds[i : i + 1].float().cpu(), pooled[i : i + 1].float().cpu())
    del pipe
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    logger.info("Encoded %d validation prompt(s) not in the embeddings file on the %s (text encoders freed)",
                len(missing), "GPU" if on_gpu else "CPU")
    return embeddings


@torch.no_grad()
def sample_images(accelerator, transformer, vae, scheduler, settings: SampleSettings, output_dir: Path, step: int,
                  vae_home: str | torch.device) -> list[str]:
    """Writes `samples/step-<step>-<i>.png` for each prompt (also to the trackers) and returns their paths relative
    to `output_dir`. The VAE goes back to `vae_home` afterwards (the CPU when latents are cached)."""
    from diffusers import FluxPipeline

    model = accelerator.unwrap_model(transformer)
    vae.to(accelerator.device)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=model, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    (output_dir / "samples").mkdir(exist_ok=True)
    was_training = model.training
    model.eval()
    files = []
    with accelerator.autocast():
        for i, (prompt, (prompt_embeds, pooled)) in enumerate(settings.prompts.items()):
            image = pipe(prompt_embeds=prompt_embeds.to(accelerator.device, vae.dtype),
                         pooled_prompt_embeds=pooled.to(accelerator.device, vae.dtype),
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

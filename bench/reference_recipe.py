#!/usr/bin/env python
"""The plain QLoRA recipe, with the libraries' standard calls, for a side-by-side with train_qlora_flux.py.

    python bench/reference_recipe.py --model /dev/shm/fluxbench/model --width 512 --height 768 --steps 20

What diffusers' QLoRA examples do (FLUX.1: `train_dreambooth_lora_flux.py` with `--bnb_quantization_config_path`;
FLUX.2: `train_dreambooth_lora_flux2.py` / `_flux2_klein.py`): diffusers' NF4 loading (`BitsAndBytesConfig`), peft's
`prepare_model_for_kbit_training`, a LoRA of --rank via `add_adapter` on the examples' default targets (the
attention projections; FLUX.2 adds the single blocks' fused qkv+MLP input and their output projection), LoRA weights
in fp32, gradient checkpointing, bitsandbytes' AdamW8bit, bf16 autocast, batch 1, on cached latents and 77-token
embeddings (random, of the model's shapes; the family read from the folder). Prints one JSON line: median s/step
(first 3 steps excluded), peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=str, required=True, help="Pipeline folder with transformer/.")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()

    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, prepare_model_for_kbit_training

    from flux_qlora import families, flow
    from flux_qlora.reports import launch_seconds

    device = torch.device("cuda")  # diffusers' bitsandbytes loading needs a GPU
    family = families.detect(args.model)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    prequantized = "quantization_config" in json.loads(Path(args.model, "transformer", "config.json").read_text())
    quantization = {} if prequantized else {"quantization_config": nf4}  # bench/build_nf4_model.py's: as it is
    transformer = family.transformer_cls().from_pretrained(args.model, subfolder="transformer", dtype=torch.bfloat16,
                                                           **quantization)
    transformer = prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
    config = transformer.config
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=example_targets(family, config.num_single_layers)))
    cast_training_params(transformer, dtype=torch.float32)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    model_gib = torch.cuda.memory_allocated(device) / 2**30
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)

    h, w = args.height // 8, args.width // 8
    latents = torch.randn(1, config.in_channels // 4, h, w, device=device, dtype=torch.bfloat16)
    prompt_embeds = torch.randn(1, 77, config.joint_attention_dim, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(1, config.get("pooled_projection_dim", 0), device=device, dtype=torch.bfloat16)
    text_ids = family.text_ids(77).to(device, torch.bfloat16)
    image_ids = family.image_ids(h, w, device=device, dtype=torch.bfloat16)
    guidance = torch.ones(1, device=device) if config.guidance_embeds else None
    torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        noise = torch.randn_like(latents)
        sigma = torch.rand(1, device=device)
        noisy = (1 - sigma) * latents + sigma * noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = family.forward(transformer, flow.pack_latents(noisy), sigma, guidance, prompt_embeds, pooled,
                                  text_ids, image_ids)
        loss = torch.nn.functional.mse_loss(flow.unpack_latents(pred, h, w).float(), (noise - latents).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the example logs the loss every step
        times.append(time.perf_counter() - start)
        if len(times) == 1:  # start-up as the trainer's summary counts it: process start to the first step done
            first_step_s = launch_seconds(device)
    print(json.dumps({"config": "reference", "resolution": f"{args.width}x{args.height}",
                      "seconds_since_launch": {"first_step": first_step_s},
                      "s_per_step": statistics.median(times[3:]),
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "model_gib": model_gib,
                      "final_loss": losses[-1], "losses": losses, "rank": args.rank}))


def example_targets(family, single_blocks: int) -> list[str]:
    """The examples' default LoRA targets: FLUX.1's attention projections; FLUX.2's add the single blocks' fused
    qkv+MLP projection and each single block's output projection (named per block: `to_out` alone would be a
    ModuleList in the double blocks)."""
    targets = ["to_k", "to_q", "to_v", "to_out.0"]
    if family.name.startswith("flux2"):
        targets += ["to_qkv_mlp_proj", *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(single_blocks))]
    return targets


if __name__ == "__main__":
    main()

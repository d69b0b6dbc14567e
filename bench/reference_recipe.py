#!/usr/bin/env python
"""The plain QLoRA recipe, with the libraries' standard calls, for a side-by-side with train_qlora_flux.py.

    python bench/reference_recipe.py --model /dev/shm/fluxbench/model --width 512 --height 768 --steps 20

What diffusers' Flux QLoRA example does: diffusers' NF4 loading (`BitsAndBytesConfig`), peft's
`prepare_model_for_kbit_training`, a rank-4 LoRA on the attention projections via `add_adapter`, LoRA weights in
fp32, gradient checkpointing, bitsandbytes' AdamW8bit, bf16 autocast, batch 1, on cached latents and embeddings
(random, of FLUX.1-dev's shapes). Prints one JSON line: median s/step (first 3 steps excluded), peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=str, required=True, help="Pipeline folder with transformer/.")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, prepare_model_for_kbit_training

    from flux_qlora import flow
    from flux_qlora.families.flux1 import FLUX1
    from flux_qlora.reports import launch_seconds

    device = torch.device("cuda")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    transformer = FluxTransformer2DModel.from_pretrained(args.model, subfolder="transformer", quantization_config=nf4,
                                                         dtype=torch.bfloat16)
    transformer = prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    cast_training_params(transformer, dtype=torch.float32)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    model_gib = torch.cuda.memory_allocated(device) / 2**30
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)

    h, w = args.height // 8, args.width // 8
    latents = torch.randn(1, 16, h, w, device=device, dtype=torch.bfloat16)
    prompt_embeds = torch.randn(1, 77, 4096, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device=device, dtype=torch.bfloat16)
    text_ids = torch.zeros(77, 3, device=device, dtype=torch.bfloat16)
    image_ids = FLUX1.image_ids(h, w, device=device, dtype=torch.bfloat16)
    guidance = torch.ones(1, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        noise = torch.randn_like(latents)
        sigma = torch.rand(1, device=device)
        noisy = (1 - sigma) * latents + sigma * noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = transformer(hidden_states=flow.pack_latents(noisy), timestep=sigma, guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                               img_ids=image_ids, return_dict=False)[0]
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
                      "s_per_step": statistics.median(times[3:]), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "model_gib": model_gib,
                      "final_loss": losses[-1]}))


if __name__ == "__main__":
    main()

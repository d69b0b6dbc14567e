#!/usr/bin/env python
"""A random transformer of a real config written straight into NF4 (bitsandbytes' pre-quantized layout), block by
block, for models whose bf16 checkpoint fits neither the GPU machine's disk nor its RAM: FLUX.2 [dev]'s 32 B
parameters are 64 GB in bf16, ~17 GiB in NF4.

    python bench/build_nf4_model.py --model flux2-dev --output /dev/shm/dev/model/transformer

Each linear layer NF4 takes gets a random bf16 weight (std 1/sqrt(fan_in): activations stay finite) on the device,
quantized there and moved to the CPU; the other weights stay bf16. The trainer's and infer.py's loader read the
folder as any pre-quantized checkpoint (--base_precision nf4). Values don't matter for speed and memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from flux_qlora.families import Family


def build_nf4_transformer(folder: Path, family: Family, config: dict, device: str = "cuda",
                          seed: int = 0) -> Path:
    """Writes config.json and diffusion_pytorch_model.safetensors (NF4 blocks) of a random `config` transformer."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    from flux_qlora import models

    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        model = family.transformer_cls().from_config(config)
    quantized = set(models._replace_linears_with_nf4(model, torch.bfloat16))
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            key = f"{name}.{param_name}" if name else param_name
            if name in quantized and param_name == "weight":
                fan_out, fan_in = module.out_features, module.in_features
                weight = torch.randn(fan_out, fan_in, device=device, dtype=torch.bfloat16, generator=generator)
                module.weight = models._nf4_weight(weight / fan_in**0.5, module, torch.device(device))
                for k, v in module.state_dict().items():  # packed weight + its quantization state
                    if k.startswith("weight"):
                        state[f"{name}.{k}"] = v.detach().to("cpu").contiguous()
                module.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # free the device copy
            else:
                fan_in = param.shape[-1] if param.dim() > 1 else 1
                value = torch.randn(param.shape, device=device, dtype=torch.bfloat16, generator=generator)
                state[key] = (value / fan_in**0.5 if param.dim() > 1 else value * 0.02).to("cpu")
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": family.transformer_class}, indent=2))
    return folder


def main() -> None:
    from bench_train import MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), required=True)
    parser.add_argument("--output", type=Path, required=True, help="The transformer folder to write.")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    family, config = MODELS[args.model]
    start = time.time()
    build_nf4_transformer(args.output, family, config, args.device)
    print(f"built an NF4 {family.label} transformer in {args.output} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()

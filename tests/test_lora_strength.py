"""The same LoRA strength in every loader: alpha / rank is folded into the saved weights."""

from __future__ import annotations

import torch
from helpers import tiny_forward
from safetensors.torch import load_file

from flux_qlora.lora import LORA_WEIGHT_NAME, add_lora, read_lora_metadata, save_lora

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def test_alpha_other_than_rank_gives_the_same_strength_in_diffusers_and_in_a_scale_1_loader(tiny_model, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    torch.manual_seed(0)
    add_lora(transformer, 4, 8, "gaussian", TARGETS)  # alpha 8, rank 4: scale 2
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    trained = tiny_forward(transformer)
    save_lora(transformer, tmp_path, fold_alpha=True)
    assert read_lora_metadata(tmp_path / LORA_WEIGHT_NAME)["lora_alpha"] == 4  # = rank: scale 1 everywhere

    # diffusers' loader
    pipe = FluxPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(tiny_forward(pipe.transformer), trained, rtol=1e-4, atol=1e-5)

    # what ComfyUI does with a file without .alpha tensors: W + B @ A at scale 1
    state = load_file(tmp_path / LORA_WEIGHT_NAME)
    by_hand = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    with torch.no_grad():
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                b = state[f"transformer.{name}.lora_B.weight"]
                by_hand.get_submodule(name).weight += b @ a
    torch.testing.assert_close(tiny_forward(by_hand), trained, rtol=1e-4, atol=1e-5)

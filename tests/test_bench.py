"""The benchmark tools under bench/ that run without a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, run_script


def test_memory_at_peak_finds_the_peak_and_who_allocated_it(tmp_path):
    """bench/memory_at_peak.py on a snapshot in torch.cuda.memory._snapshot()'s layout (recording needs a GPU)."""
    import pickle

    def alloc(addr, mib, name):
        return {"action": "alloc", "addr": addr, "size": mib << 20,
                "frames": [{"filename": "??", "line": 0, "name": "torch::unwind()"},
                           {"filename": "/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
                           {"filename": "/work/train_qlora_flux.py", "line": 7, "name": name}]}

    trace = [alloc(1, 100, "checkpoint_inputs"), alloc(2, 300, "dequantize"),
             {"action": "free_completed", "addr": 2, "size": 300 << 20}, alloc(3, 50, "dequantize")]
    # At the dump: 1 GiB allocated before the recording (weights) + the 150 MiB still held by the trace.
    segments = [{"blocks": [{"size": 1 << 30, "state": "active_allocated"}, {"size": 150 << 20,
                                                                          "state": "active_allocated"}]}]
    path = tmp_path / "snapshot.pickle"
    path.write_bytes(pickle.dumps({"segments": segments, "device_traces": [trace]}))
    out = run_script("bench/memory_at_peak.py", path, "--depth", "1").stdout
    assert "peak: 1.391 GiB = 1.000 GiB allocated before the recording + 0.391 GiB from 2 allocations" in out
    assert "reached by a 300.0 MiB allocation at train_qlora_flux.py:7 dequantize" in out
    assert "0.293 GiB      1 x  train_qlora_flux.py:7 dequantize" in out




def test_build_nf4_model_writes_a_prequantized_transformer_the_loader_reads(tmp_path):
    """bench/build_nf4_model.py (how FLUX.2 [dev]'s 32 B are benchmarked without 64 GB of bf16): here FLUX.2's tiny
    config on the CPU, loaded as a pre-quantized checkpoint and run."""
    import sys

    import torch

    from flux_qlora.families.flux2 import DEV, TINY_TEXT_DIM
    from flux_qlora.models import count_nf4_layers, load_transformer

    sys.path.insert(0, str(ROOT / "bench"))
    from build_nf4_model import build_nf4_transformer

    config = dict(_class_name="Flux2Transformer2DModel", in_channels=32, num_layers=1, num_single_layers=1,
                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=3 * TINY_TEXT_DIM,
                  timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
    build_nf4_transformer(tmp_path / "transformer", DEV, config, "cpu")
    model = load_transformer(str(tmp_path / "transformer"), "cpu", torch.float32)
    assert count_nf4_layers(model) == 12 + 2 + 3  # the double and single block's linears, the shared modulation
    g = torch.Generator().manual_seed(0)
    out = DEV.forward(model, torch.randn(1, 12, 32, generator=g), torch.tensor([0.5]), torch.tensor([3.5]),
                      torch.randn(1, 5, 96, generator=g), torch.zeros(1, 0), DEV.text_ids(5), DEV.image_ids(6, 8))
    assert out.shape == (1, 12, 32) and bool(torch.isfinite(out).all()) and out.std() > 0.1



def test_reference_recipe_puts_its_lora_on_exactly_the_layers_of_our_default_preset(tmp_path):
    """bench/reference_recipe.py (diffusers' examples' QLoRA calls, the baseline of our speed-ups) and the trainer's
    default `--lora_layers attention` wrap the same layers of a FLUX.2 transformer: a comparison at one rank is fair."""
    import json
    import sys

    from peft import LoraConfig, inject_adapter_in_model

    from flux_qlora.families.flux2 import KLEIN
    from flux_qlora.lora import target_modules

    sys.path.insert(0, str(ROOT / "bench"))
    from reference_recipe import example_targets

    from flux_qlora.families.flux2 import tiny_transformer

    config = json.loads(json.dumps(tiny_transformer(KLEIN).config))

    def wrapped(targets: list[str]) -> set[str]:
        transformer = KLEIN.transformer_cls().from_config(config)
        inject_adapter_in_model(LoraConfig(r=4, target_modules=targets), transformer)
        return {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}

    ours = wrapped(target_modules("attention", KLEIN, config))
    assert ours == wrapped(example_targets(KLEIN, config["num_single_layers"]))
    assert {"single_transformer_blocks.1.attn.to_out", "single_transformer_blocks.1.attn.to_qkv_mlp_proj",
            "transformer_blocks.1.attn.to_out.0"} <= ours


@pytest.mark.gpu  # diffusers' bitsandbytes loading needs a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="diffusers' NF4 loading needs a GPU (the device machine)")
def test_reference_recipe_trains_a_tiny_flux2_model(tmp_path):
    import json

    from flux_qlora.families.flux2 import KLEIN

    model = KLEIN.build_tiny_pipeline(tmp_path / "model")
    out = run_script("bench/reference_recipe.py", "--model", model, "--width", 64, "--height", 64, "--steps", 5,
                     "--rank", 8).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["rank"] == 8 and len(result["losses"]) == 5 and result["peak_gib"] > 0
    assert all(0 < loss < 10 for loss in result["losses"]) and result["s_per_step"] > 0


def test_inference_bench_loras_fit_the_model_they_are_built_for(tmp_path):
    """bench/bench_infer.py's random LoRAs (read from a skeleton of the transformer's config, on the default preset's
    layers) load into that model: here tiny FLUX.2 [klein], every layer of the file placed, each shape checked by
    peft."""
    import json
    import sys

    from safetensors.torch import load_file

    from flux_qlora.families.flux2 import KLEIN, tiny_transformer

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_infer import build_loras

    transformer = tiny_transformer(KLEIN)
    loras = build_loras(tmp_path / "loras", KLEIN, json.loads(json.dumps(transformer.config)))
    assert [p.name for p in loras] == ["lora-r8.safetensors", "lora-r32.safetensors", "lora-r16.safetensors"]
    transformer.load_lora_adapter(str(loras[-1]), prefix="transformer", adapter_name="r16")
    placed = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    layers = {key.removeprefix("transformer.").removesuffix(".lora_A.weight")
              for key in load_file(loras[-1]) if key.endswith("lora_A.weight")}
    assert placed == layers and "single_transformer_blocks.1.attn.to_out" in layers

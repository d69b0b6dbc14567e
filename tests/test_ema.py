"""LoRA EMA: one flat average beside the trained LoRA, saved as its own diffusers-loadable file, resumed exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import VALIDATION, run_script, train_args
from safetensors.torch import load_file

LORA, EMA = "pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"


def test_ema_unit_update_is_the_moving_average():
    from flux_qlora.step import FlatLora, LoraEma

    a = torch.nn.Parameter(torch.zeros(3))
    flat = FlatLora([a], torch.bfloat16)
    ema = LoraEma(flat, decay=0.9)
    for value in (1.0, 2.0):
        with torch.no_grad():
            flat.master.fill_(value)
        ema.update()
    torch.testing.assert_close(ema.shadow, torch.full((3,), 0.9 * 0.1 * 1.0 + 0.1 * 2.0))  # 0 -> 0.1 -> 0.29
    with ema.weights():
        assert a.dtype == torch.float32 and torch.equal(a.detach(), ema.shadow)
    assert a.dtype == torch.bfloat16 and float(a.detach()[0]) == 2.0  # back to the trained weights' compute copy


# The ends of (0, 1), which --ema_decay takes: 1e-30 gives lerp's weight 1.0 exactly (the trained weights), 1 - 1e-12
# moves the EMA by 1e-12 of the way per step (the initial weights, to 1e-9).
@pytest.mark.parametrize("decay, expect", [pytest.param("1e-30", "the trained LoRA", id="decay-near-0"),
                                           pytest.param("0.999999999999", "the initial LoRA", id="decay-near-1")])
def test_ema_file_is_saved_and_follows_its_decay(decay, expect, tiny_model, tiny_images_master, tiny_embeddings,
                                                  tmp_path):
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out",
                                                  "--max_train_steps", "3", "--learning_rate", "1e-3", "--use_ema",
                                                  "--ema_decay", decay, "--validation_prompt", VALIDATION,
                                                  "--validate_ema", "--validation_inference_steps", "2"))
    trained, ema = load_file(tmp_path / "out" / LORA), load_file(tmp_path / "out" / EMA)
    assert trained.keys() == ema.keys()
    if expect == "the trained LoRA":
        assert all(torch.equal(ema[k], trained[k]) for k in trained)
    else:  # B starts at zero (gaussian init): the EMA never moved
        assert all(v.abs().max() < 1e-9 for k, v in ema.items() if "lora_B" in k)
        assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path / "out", weight_name=EMA)  # a LoRA diffusers loads like any other
    assert (tmp_path / "out" / "samples" / "step-000003-0.png").exists()


def test_ema_resumes_exactly(resumed_run):
    """conftest's resumed_run (bf16, --ema_decay 0.7): the EMA resumed from step 3 is the uninterrupted run's."""
    full, resumed = load_file(resumed_run / "full" / EMA), load_file(resumed_run / "interrupted" / EMA)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-6, atol=1e-8)
    trained = load_file(resumed_run / "full" / LORA)
    assert any(not torch.allclose(full[k], trained[k]) for k in trained)  # an average, not the last weights

"""What each GPU can run, and the memory plan: pure rules, checked on the CPU for every GPU our users have."""

from __future__ import annotations

import pytest
import torch
from helpers import run_script, tiny_forward, train_args

from flux_qlora.errors import UserError
from flux_qlora.families.flux1 import FLUX1, FLUX_DEV_CONFIG
from flux_qlora.hardware import Device, check_bf16, check_fp8_device, default_dtype, pick_attention_backend
from flux_qlora.memory import TrainingShape, plan_training, plans_that_fit

CPU = Device("cpu")
T4 = Device("cuda", (7, 5), "Tesla T4", 14.76)  # 15,843,721,216 bytes, as torch reports it
V100 = Device("cuda", (7, 0), "Tesla V100", 16.0)
RTX3090 = Device("cuda", (8, 6), "RTX 3090", 24.0)
RTX4090 = Device("cuda", (8, 9), "RTX 4090", 24.0)
H100 = Device("cuda", (9, 0), "H100", 80.0)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("device, dtype, expected", [
    pytest.param(H100, BF16, "_native_cudnn", id="h100-bf16"),
    pytest.param(H100, FP16, "_native_cudnn", id="h100-fp16"),
    pytest.param(RTX4090, BF16, "_native_flash", id="4090-bf16"),
    pytest.param(RTX3090, FP16, "_native_flash", id="3090-fp16"),
    pytest.param(H100, FP32, "_native_efficient", id="h100-fp32-no-flash-kernel"),
    pytest.param(T4, FP16, "_native_efficient", id="t4-fp16-no-flash-before-ampere"),
    pytest.param(V100, FP32, "_native_efficient", id="v100-fp32"),
    pytest.param(CPU, FP32, None, id="cpu-sdpa-choice"),
])
def test_training_attention_default_always_has_a_kernel(device, dtype, expected):
    assert pick_attention_backend(None, device, dtype) == expected


@pytest.mark.parametrize("backend, device, dtype, expect", [
    pytest.param("_native_flash", T4, FP16, ["compute capability >= 8.0", "_native_efficient"], id="flash-on-t4"),
    pytest.param("_native_flash", H100, FP32, ["no fp32 kernel", "--mixed_precision"], id="flash-fp32"),
    pytest.param("_flash_3", RTX4090, BF16, [">= 9.0"], id="fa3-before-hopper"),
    pytest.param("_native_cudnn", CPU, FP32, ["needs a CUDA GPU", "--attention_backend native"], id="cudnn-on-cpu"),
    pytest.param("_native_flash", H100, BF16, [], id="flash-on-h100-runs"),
    pytest.param("_native_flash", CPU, FP32, [], id="flash-on-cpu-runs"),
    pytest.param("_native_efficient", T4, FP16, [], id="efficient-on-t4-runs"),
])
def test_explicit_attention_backend_is_refused_where_it_has_no_kernel(backend, device, dtype, expect):
    if not expect:
        assert pick_attention_backend(backend, device, dtype) == backend
        return
    with pytest.raises(UserError) as error:
        pick_attention_backend(backend, device, dtype)
    assert f"--attention_backend {backend}" in str(error.value)
    for fragment in expect:
        assert fragment in str(error.value)


def test_cudnn_training_hands_single_blocks_attention_gradients_contiguous(tiny_model):
    """PyTorch's cuDNN attention backward reuses one cuDNN graph for every grad_output stride (models.py); the single
    blocks' attention output, concatenated with their MLP's, gets its gradient as a slice unless it is copied
    contiguous. The copy changes no gradient."""
    from diffusers import FluxTransformer2DModel

    grads, contiguous = {}, {}
    for fixed in (False, True):
        transformer = FluxTransformer2DModel.from_pretrained(tiny_model / "transformer")
        seen = contiguous[fixed] = []

        def probe(module, inputs, output, seen=seen):  # sees the gradient the attention's backward gets
            output.register_hook(lambda grad: seen.append(grad.is_contiguous()))

        for block in transformer.single_transformer_blocks:
            block.attn.register_forward_hook(probe)
        if fixed:
            FLUX1.give_attention_contiguous_gradients(transformer)
        tiny_forward(transformer, grad=True).square().sum().backward()
        grads[fixed] = {n: p.grad for n, p in transformer.named_parameters()}
    blocks = len(transformer.single_transformer_blocks)
    assert contiguous == {False: [False] * blocks, True: [True] * blocks}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=0)


def test_infer_defaults_to_the_half_precision_the_device_has():
    assert [default_dtype(d) for d in (CPU, T4, V100, RTX3090, H100)] == ["bf16", "fp16", "fp16", "bf16", "bf16"]
    for device in (T4, V100):
        check_bf16("--dtype", default_dtype(device), device)  # the default is never the refused bf16


def test_bf16_and_fp8_checks_name_the_fix():
    with pytest.raises(UserError, match="Tesla T4 .compute capability 7.5. has no bf16. Use --mixed_precision fp16"):
        check_bf16("--mixed_precision", "bf16", T4)
    with pytest.raises(UserError, match="--dtype bf16: .* Use --dtype fp16"):
        check_bf16("--dtype", "bf16", V100)
    check_bf16("--mixed_precision", "bf16", RTX3090)
    check_bf16("--mixed_precision", "fp16", T4)
    with pytest.raises(UserError, match="--fp8 needs compute capability >= 8.9"):
        check_fp8_device(RTX3090, "--fp8")
    with pytest.raises(UserError, match="on the CPU"):
        check_fp8_device(CPU, "--fp8")
    check_fp8_device(RTX4090, "--fp8")


def klein_shape(width: int, height: int) -> TrainingShape:
    """FLUX.2 [klein]'s benchmark runs: rank 16 on the default preset (its config's single blocks named)."""
    from flux_qlora.families.flux2 import KLEIN, KLEIN_4B_CONFIG
    from flux_qlora.lora import target_modules

    return TrainingShape(width, height, 77, rank=16, targets=tuple(target_modules("attention", KLEIN,
                                                                                  KLEIN_4B_CONFIG)))


# GPU peaks measured with `--compile --cuda_graphs` (BENCHMARKS.md; 8-bit AdamW, bf16, batch 1): FLUX.1-dev-shaped
# runs at rank 4 on the attention layers, FLUX.2 [klein] 4B and 9B at rank 16 (H100).
MEASURED = [
    pytest.param(FLUX_DEV_CONFIG, TrainingShape(512, 768, 77), 6.85, id="nf4-ckpt-512x768"),
    pytest.param(FLUX_DEV_CONFIG, TrainingShape(1024, 1024, 77), 8.02, id="nf4-ckpt-1024x1024"),
    pytest.param(FLUX_DEV_CONFIG, TrainingShape(512, 768, 77, gradient_checkpointing=False), 13.73, id="nf4-512x768"),
    pytest.param(FLUX_DEV_CONFIG, TrainingShape(512, 768, 77, nf4=False), 23.14, id="bf16-ckpt-512x768"),
    pytest.param("klein-4b", klein_shape(512, 768), 3.16, id="klein-4b-nf4-ckpt-512x768"),
    pytest.param("klein-9b", klein_shape(1024, 1024), 7.92, id="klein-9b-nf4-ckpt-1024x1024"),
]


@pytest.mark.parametrize("config, shape, measured_gib", MEASURED)
def test_memory_plan_predicts_the_measured_peaks(config, shape, measured_gib):
    from flux_qlora.families.flux2 import KLEIN, KLEIN_4B_CONFIG, KLEIN_9B_CONFIG
    from flux_qlora.lora import target_modules

    if isinstance(config, str):  # the 9B's single blocks are more: its own preset's names
        config = {"klein-4b": KLEIN_4B_CONFIG, "klein-9b": KLEIN_9B_CONFIG}[config]
        shape.targets = tuple(target_modules("attention", KLEIN, config))
    assert plan_training(config, shape).peak_gib == pytest.approx(measured_gib, rel=0.05)


def test_memory_plan_counts_encoding_the_latents_before_the_model_loads():
    """Caching the latents runs the VAE alone, one image at a time (~1.7 GiB at 1024x1024): for a small enough model
    it is the run's peak. Encoding each step instead adds the VAE to the step."""
    from flux_qlora.families.flux2 import KLEIN_4B_CONFIG

    small = {**KLEIN_4B_CONFIG, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2}
    cached = plan_training(small, TrainingShape(1024, 1024, 77, latents="memory"))
    assert cached.caching_gib == pytest.approx(1.68, abs=0.01)
    assert cached.peak_gib == cached.caching_gib > cached.weights_gib + cached.lora_gib + cached.activations_gib
    assert "caching the latents ~1.7 GiB" in cached.describe()
    each_step = plan_training(small, TrainingShape(1024, 1024, 77, latents="none"))
    assert each_step.caching_gib == 0 and each_step.activations_gib == pytest.approx(cached.caching_gib)
    # a model whose step outgrows it: the step is the peak
    big = plan_training(KLEIN_4B_CONFIG, TrainingShape(1024, 1024, 77))
    assert big.peak_gib == big.weights_gib + big.lora_gib + big.activations_gib > big.caching_gib


def test_memory_plan_grows_with_what_costs_memory():
    base = TrainingShape(512, 768, 77, num_images=10)
    peak = plan_training(FLUX_DEV_CONFIG, base)
    assert plan_training(FLUX_DEV_CONFIG, TrainingShape(512, 768, 77, batch_size=2)).activations_gib > \
        1.8 * peak.activations_gib - 0.2
    assert plan_training(FLUX_DEV_CONFIG, TrainingShape(512, 768, 77, rank=64)).lora_gib > 10 * peak.lora_gib
    assert plan_training(FLUX_DEV_CONFIG, TrainingShape(512, 768, 77, checkpointing_interval=2)).peak_gib > \
        peak.peak_gib
    offloaded = plan_training(FLUX_DEV_CONFIG, TrainingShape(512, 768, 77, offload_activations=True, num_images=10))
    assert offloaded.activations_gib < peak.activations_gib and offloaded.ram_gib > peak.ram_gib


def test_a_gpu_too_small_gets_the_flags_that_fit():
    # 512x768 without checkpointing needs ~13.7 GiB: on an 8 GB card, checkpointing or offloading would fit
    fits = plans_that_fit(FLUX_DEV_CONFIG, TrainingShape(512, 768, 77, gradient_checkpointing=False), 7.5)
    assert fits == ["--gradient_checkpointing", "--offload_activations"]
    # the `8gb` profile at 1024x1024 with the blog's flags (~8.0 GiB against 7.5): offloading or a smaller size
    assert plans_that_fit(FLUX_DEV_CONFIG, TrainingShape(1024, 1024, 77), 7.5) == \
        ["--offload_activations", "--width 512 --height 512"]
    assert plans_that_fit(FLUX_DEV_CONFIG, TrainingShape(1024, 1024, 77), 4.0) == []  # the weights alone don't fit


def test_dry_run_prints_the_plan_and_loads_nothing(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                           tmp_path / "out", "--dry_run"))
    assert result.stdout.startswith("Memory plan: GPU peak ~") and len(result.stdout.splitlines()) == 1
    assert "system RAM ~" in result.stdout
    assert not (tmp_path / "out").exists()  # nothing written, no model loaded
    assert "Transformer loaded" not in result.stderr


def test_pitfalls_get_one_warning_line_each(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                           tmp_path / "out", "--dry_run", "--guidance_scale", "3.5",
                                                           "--learning_rate", "2e-3"))
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and "train_qlora_flux" in line]
    assert any("--guidance_scale 3.5" in w and "guidance-distilled" in w for w in warnings), warnings
    assert any("--learning_rate 0.002" in w and "high for a LoRA" in w for w in warnings), warnings
    quiet = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                          tmp_path / "out", "--dry_run"))
    assert "guidance-distilled" not in quiet.stderr and "high for a LoRA" not in quiet.stderr

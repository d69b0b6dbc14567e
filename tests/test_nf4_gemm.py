"""The Triton NF4 GEMMs (`FLUX_QLORA_NF4_GEMM=triton`): the same products as dequantizing with bitsandbytes' numbers
and multiplying, for the forward, the input gradient, a LoRA layer's training step, and under torch.compile.

On a GPU they run as compiled Triton kernels; on the CPU in Triton's interpreter (a subprocess with
TRITON_INTERPRET=1, which Triton reads when the kernels are defined), where Triton is installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (torch's CPU wheels come without it; CUDA torch brings it: the GPU suite runs "
           "these, as does a CPU machine with `pip install triton`)")


def layer_inputs(device: str, dtype: torch.dtype):
    from test_nf4 import nf4_model

    from flux_qlora.nf4 import make_nf4_compilable

    model = nf4_model(512, 768, dtype=dtype, device=device)  # 2 x 3 tiles of 256, 24 scale blocks per row
    make_nf4_compilable(model)
    layer = model.to_q
    quant = (layer.nf4_packed, layer.nf4_absmax_q, layer.nf4_absmax_code, layer.nf4_absmax_scale,
             layer.nf4_absmax_offset, layer.nf4_code)
    return model, quant, layer.nf4_layout


def check_products(device: str) -> None:
    """Forward and input-gradient products against bitsandbytes' dequantized weight times the input, in fp32."""
    import bitsandbytes as bnb

    from flux_qlora import nf4_gemm

    for dtype in (torch.bfloat16, torch.float16):
        model, quant, (shape, blocksize, blocksize2) = layer_inputs(device, dtype)
        weight = bnb.functional.dequantize_4bit(model.to_q.weight.data, model.to_q.weight.quant_state).to(dtype)
        assert nf4_gemm.supports(shape, blocksize, dtype)
        x = torch.randn(37, shape[1], device=device, dtype=dtype)  # 37 rows: a partial tile of rows
        grad = torch.randn(37, shape[0], device=device, dtype=dtype)
        out = torch.ops.flux_qlora.nf4_x_wt(x, *quant, *shape, blocksize, blocksize2)
        grad_in = torch.ops.flux_qlora.nf4_g_w(grad, *quant, *shape, blocksize, blocksize2)
        # Both exact up to the output's rounding: fp32 sums of the same products, then one rounding to `dtype`.
        for got, expected in ((out, x.float() @ weight.float().t()), (grad_in, grad.float() @ weight.float())):
            assert got.dtype == dtype and got.shape == expected.shape
            torch.testing.assert_close(got.float(), expected, rtol=2 ** -8, atol=1e-3)
        strided = torch.randn(37, 2 * shape[1], device=device, dtype=dtype)[:, ::2]  # a non-contiguous input
        torch.testing.assert_close(torch.ops.flux_qlora.nf4_x_wt(strided, *quant, *shape, blocksize, blocksize2),
                                   torch.ops.flux_qlora.nf4_x_wt(strided.contiguous(), *quant, *shape, blocksize,
                                                                 blocksize2))
    assert not nf4_gemm.supports((512, 64), 64, torch.bfloat16)  # Flux's 64-wide input layer stays on torch ops
    assert not nf4_gemm.supports((512, 768), 64, torch.float32)


def check_lora_layer_trains_alike(device: str) -> None:
    """A LoRA on the NF4 layer: output, input gradient and LoRA gradients with the Triton GEMMs equal the torch
    ops' (eager and compiled), and the backward still saves only the packed weight."""
    from test_nf4 import forward_backward

    from flux_qlora import nf4

    def run(gemm: str, compiled: bool):
        nf4.GEMM = gemm
        model, _, _ = layer_inputs(device, torch.bfloat16)
        model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q"]), model)
        for name, p in model.named_parameters():
            if "lora_" in name:
                nn.init.normal_(p, std=0.1)
        if compiled:
            with torch._functorch.config.patch(cse=False):
                return forward_backward(torch.compile(model, fullgraph=True), x)
        return forward_backward(model, x)

    torch.manual_seed(1)
    x = torch.randn(2, 19, 768, device=device, dtype=torch.bfloat16)
    before = nf4.GEMM
    try:
        reference = run("torch", compiled=False)
        fused = [run("triton", compiled) for compiled in (False, True)]
    finally:
        nf4.GEMM = before
    for compiled, (out, grad, lora_grads, saved) in zip((False, True), fused):
        # bf16 results of sums in another order: ~1e-3 apart (relative L2), where a wrong weight, scale or tile
        # would be off by far more than bf16's 2^-8
        pairs = [(out, reference[0]), (grad, reference[1]), *zip(lora_grads, reference[2], strict=True)]
        assert len(pairs) == 4
        for got, expected in pairs:
            error = float((got.detach().float() - expected.float()).norm() / expected.float().norm())
            assert error < 2 ** -8, (compiled, error)
        if not compiled:  # the backward keeps the packed 4-bit weight, not a float copy of it
            assert not [t for t in saved if t.is_floating_point() and t.numel() == 512 * 768]


def run_checks(device: str) -> None:
    check_products(device)
    check_lora_layer_trains_alike(device)


def test_triton_nf4_gemms_equal_dequantize_then_matmul():
    if torch.cuda.is_available():
        run_checks("cuda")
        return
    tests = Path(__file__).parent
    result = subprocess.run([sys.executable, "-c", "import test_nf4_gemm; test_nf4_gemm.run_checks('cpu')"],
                            cwd=tests, env={**os.environ, "TRITON_INTERPRET": "1",
                                            "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent),
                                                                            os.environ.get("PYTHONPATH", "")])},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

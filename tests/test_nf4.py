"""The compilable NF4 layer: bitsandbytes' numbers from plain torch ops, without saving the dequantized weight."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from bench.nf4_gemm import dequantize_nf4_by_table
from flux_qlora import nf4
from flux_qlora.models import _nf4_linear, _nf4_weight
from flux_qlora.nf4 import CompilableLinear4bit, dequantize_nf4, make_nf4_compilable

# On a GPU machine the same tests check bitsandbytes' CUDA kernels (those cases are in the GPU tier: -m gpu).
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
DEVICES = ["cpu", *([CUDA] if torch.cuda.is_available() else [])]


def nf4_model(out_features: int, in_features: int, dtype=torch.float32, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    layer = _nf4_linear(linear, dtype)
    layer.weight = _nf4_weight(linear.weight.data, layer, torch.device(device))
    layer.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    model = nn.Sequential()
    model.add_module("to_q", layer)
    return model


DEQUANTIZATIONS = [dequantize_nf4, dequantize_nf4_by_table]


@pytest.mark.parametrize("dequantize", DEQUANTIZATIONS, ids=["weight", "table"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(64, 192), (384, 256)])  # 192 scales (< one outer block), 1536 (six blocks)
def test_dequantization_equals_bitsandbytes_bit_for_bit(shape, device, dequantize):
    model = nf4_model(*shape, dtype=torch.bfloat16, device=device)
    expected = bnb.functional.dequantize_4bit(model.to_q.weight.data, model.to_q.weight.quant_state)
    assert make_nf4_compilable(model) == 1 and isinstance(model.to_q, CompilableLinear4bit)
    layer = model.to_q
    weight = dequantize(*layer.nf4_quant(), *layer.nf4_layout, torch.bfloat16)
    assert weight.dtype == expected.dtype and torch.equal(weight, expected)
    assert not any(key.startswith("to_q.nf4_") for key in model.state_dict())  # views, never saved twice


def forward_backward(model: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    out.square().sum().backward()
    return out, x.grad, [p.grad for n, p in model.named_parameters() if "lora_" in n], saved


@pytest.mark.parametrize("device", DEVICES)
def test_lora_training_matches_bitsandbytes_and_saves_no_dequantized_weight(device):
    x = torch.randn(2, 7, 256, device=device)
    results = []
    for fast in (False, True):
        model = nf4_model(384, 256, device=device)
        model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q"]), model)
        for name, p in model.named_parameters():
            if "lora_" in name:
                nn.init.normal_(p, std=0.1)
        if fast:
            assert make_nf4_compilable(model) == 1
        results.append(forward_backward(model, x))
    (out, grad, lora_grads, _), (fast_out, fast_grad, fast_lora_grads, saved) = results
    close = {"rtol": 1e-4, "atol": 1e-4}  # fp32 sums in another order
    torch.testing.assert_close(fast_out, out, **close)
    torch.testing.assert_close(fast_grad, grad, **close)
    assert len(fast_lora_grads) == 2
    for a, b in zip(fast_lora_grads, lora_grads):
        torch.testing.assert_close(a, b, **close)
    # The backward keeps the packed 4-bit weight, not a float copy of it (4-8x the size).
    assert not [t for t in saved if t.is_floating_point() and t.numel() == 384 * 256]
    assert any(t.dtype == torch.uint8 and t.numel() == 384 * 256 // 2 for t in saved)


@pytest.mark.parametrize("dequantize", DEQUANTIZATIONS, ids=["weight", "table"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_layer_equals_eager(device, dequantize, monkeypatch):
    monkeypatch.setattr(nf4, "DEQUANTIZE", dequantize)
    model = nf4_model(384, 256, device=device)
    make_nf4_compilable(model)
    x = torch.randn(3, 256, device=device)
    eager = forward_backward(model, x)
    # As the trainer compiles them (train_qlora_flux.py, --compile): with AOTAutograd's CSE off.
    with torch._functorch.config.patch(cse=False):
        compiled = forward_backward(torch.compile(model, fullgraph=True), x)  # fullgraph: no fallback to eager ops
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    # The compiled backward dequantizes again too, instead of keeping the forward's weight (what AOTAutograd's
    # common-subexpression elimination would otherwise make of the two identical dequantizations).
    assert not [t for t in compiled[3] if t.is_floating_point() and t.numel() >= 384 * 256]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled_layer", [False, True])
def test_nf4_layers_follow_autocast_like_nn_linear(compiled_layer, device):
    """Under autocast an fp32 input (CUDA's layer_norm output) gives a bf16 output, as nn.Linear's does; bitsandbytes
    alone returns fp32, which turned Flux's residual stream and every checkpointed block input fp32."""
    model = nf4_model(64, 192, dtype=torch.bfloat16, device=device)
    if compiled_layer:
        make_nf4_compilable(model)
    x = torch.randn(3, 192, device=device)
    with torch.autocast(device, torch.bfloat16):
        assert model(x).dtype == torch.bfloat16 == nn.Linear(192, 64, device=device)(x).dtype
    assert model(x).dtype == torch.float32  # outside autocast: the input's dtype, as before


class TwoNF4Layers(nn.Module):
    """Two NF4 layers with LoRA, as in a Flux block: the first one's output is needed again in the backward."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nf4_model(256, 256), nf4_model(256, 256)

    def forward(self, x):
        return self.second(torch.nn.functional.gelu(self.first(x)))


def recorded_checkpoint(cse: bool = False):
    """The trainer's compiled selective checkpoint (a block and its inputs in, its output out), with inductor's
    partitioner, the forward and backward graphs kept as they are so that the dequantizations can be counted."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from flux_qlora.blocks import checkpoint_recomputing_everything, compile_checkpointed

    graphs = {}

    def keep(kind):
        def compiler(graph_module, inputs):
            graphs[kind] = graph_module.graph
            return make_boxed_func(graph_module.forward)
        return compiler

    recorder = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                            partition_fn=min_cut_rematerialization_partition)
    return compile_checkpointed(checkpoint_recomputing_everything, cse=cse, backend=recorder), graphs


def input_and_lora_gradients(block: nn.Module, call, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of x and of the block's LoRA weights for the loss sum(call(x)^2); the block's are reset."""
    inputs = x.clone().requires_grad_()
    call(inputs).square().sum().backward()
    lora = [p.grad for n, p in block.named_parameters() if "lora_" in n]
    block.zero_grad(set_to_none=True)
    return [inputs.grad, *lora]


def dequantizations(graph) -> int:
    """One right shift (the high nibble) per dequantized weight."""
    return sum(node.op == "call_function" and "rshift" in str(node.target) for node in graph.nodes)


def saved_for_backward(graph) -> list[torch.Tensor]:
    return [node.meta["val"] for node in graph.find_nodes(op="output")[0].args[0]
            if hasattr(node, "meta") and isinstance(node.meta.get("val"), torch.Tensor)]


@pytest.mark.parametrize("cse, backward_dequantizations", [(False, 3), (True, 2)])
def test_cse_in_checkpoints_dequantizes_each_weight_once_in_the_backward(cse, backward_dequantizations):
    """Under the trainer's compiled selective checkpoint, CSE makes the recomputed forward and the input gradient
    share one dequantization per weight (2 here instead of 3: the second layer's output is not recomputed), keeps no
    dequantized weight from the forward, and changes no gradient (on by default: blocks.compile_checkpointed)."""
    block = inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q"], init_lora_weights=False), TwoNF4Layers())
    make_nf4_compilable(block)
    x = torch.randn(4, 256)

    eager = input_and_lora_gradients(block, block, x)
    with torch._functorch.config.patch(cse=False):  # process-wide off, as the trainer sets it
        run, graphs = recorded_checkpoint(cse)
        compiled = input_and_lora_gradients(block, lambda inputs: run(block, inputs), x)

    assert (dequantizations(graphs["forward"]), dequantizations(graphs["backward"])) == (2, backward_dequantizations)
    assert not [t for t in saved_for_backward(graphs["forward"]) if t.numel() >= 256 * 256]  # no dequantized weight
    assert len(compiled) == len(eager) == 5
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected)


# FP8 GEMMs on the NF4 weights (--do_fp8_training on the NF4 base, issue 18): torch runs them on the CPU too.
FP8_DEVICES = [*(["cpu"] if nf4.cpu_fp8_gemm_runs() else []),
               *([CUDA] if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) else [])]


@pytest.mark.parametrize("device", FP8_DEVICES)
def test_fp8_operands_are_the_nf4_weight_rounded_to_e4m3(device):
    """Both FP8 operands hold the NF4 weight to e4m3's precision, scaled by the output they feed (per row for
    x @ W.T, per column for g @ W), the scales read off the block scales; the row scales are tight."""
    model = nf4_model(384, 256, dtype=torch.bfloat16, device=device)
    make_nf4_compilable(model, fp8=True)
    layer = model.to_q
    quant = layer.nf4_quant()
    shape, blocksize, blocksize2 = layer.nf4_layout
    weight = dequantize_nf4(*quant, shape, blocksize, blocksize2, torch.float32)  # code x block scale, unrounded
    rows, row_scale = nf4.nf4_as_fp8(*quant, shape, blocksize, blocksize2, transposed=False)
    columns, column_scale = nf4.nf4_as_fp8(*quant, shape, blocksize, blocksize2, transposed=True)
    assert rows.dtype == columns.dtype == torch.float8_e4m3fn
    assert (rows.shape, row_scale.shape, columns.shape, column_scale.shape) == ((384, 256), (1, 384), (256, 384),
                                                                                (1, 256))
    assert columns.is_contiguous()  # W.T laid out (K, N): `_scaled_mm`'s column-major right operand is its .t()
    half_step = {"rtol": 2 ** -4, "atol": 0.0}  # e4m3 keeps 3 mantissa bits; nothing here is subnormal
    torch.testing.assert_close(rows.float() * row_scale.t(), weight, **half_step)
    torch.testing.assert_close(columns.float().t() * column_scale, weight, **half_step)
    assert torch.equal(rows.float().abs().amax(dim=1), torch.full((384,), 448.0, device=device))
    assert layer.nf4_fp8
    transposed_rows = torch.randn(256, 37, device=device, dtype=torch.bfloat16).t()  # as a gradient may arrive
    assert nf4.fp8_rows(transposed_rows)[0].is_contiguous()  # CUDA's _scaled_mm takes row-major left operands only
    runs_here = {shape: nf4.fp8_gemm_runs_here(torch.device(device), shape, 64, 256)
                 for shape in ((3072, 3072), (64, 192), (384, 64), (40, 64))}
    # FLUX.1-dev's shapes; one partial outer block of scales; 1.5 outer blocks; a side not a multiple of 16
    assert runs_here == {(3072, 3072): True, (64, 192): True, (384, 64): False, (40, 64): False}


class TwoNF4LayersBf16(nn.Module):
    def __init__(self, device: str):
        super().__init__()
        self.first = nf4_model(384, 256, dtype=torch.bfloat16, device=device).to_q
        self.second = nf4_model(256, 384, dtype=torch.bfloat16, device=device).to_q

    def forward(self, x):
        return self.second(torch.nn.functional.gelu(self.first(x)))


def lora_pair(device: str, fp8: bool) -> nn.Module:
    torch.manual_seed(1)
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["first", "second"], init_lora_weights=False),
                                    TwoNF4LayersBf16(device))
    make_nf4_compilable(model, fp8=fp8)
    return model


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach().float() - expected.detach().float()).norm() / expected.detach().float().norm())


@pytest.mark.parametrize("device", FP8_DEVICES)
def test_fp8_gemms_give_a_lora_the_bf16_gradients_to_fp8_precision(device):
    """Two NF4 layers with LoRA in bf16, as the trainer runs them: with the products in FP8 the output, the input's
    gradient and every LoRA gradient (the first layer's pass through the second's FP8 input gradient) stay within
    a few percent of the bf16 GEMMs', eager and compiled (so the compiled graph runs FP8 too), and the backward keeps
    no float copy of a weight."""
    x = torch.randn(2, 37, 256, device=device, dtype=torch.bfloat16)
    results = {}
    for gemm, compiled in (("torch", False), ("fp8", False), ("fp8", True)):
        model = lora_pair(device, fp8=gemm == "fp8")
        if compiled:
            with torch._functorch.config.patch(cse=False):
                results[gemm, compiled] = forward_backward(torch.compile(model, fullgraph=True), x)
        else:
            results[gemm, compiled] = forward_backward(model, x)
    bf16 = results["torch", False]
    assert len(bf16[2]) == 4
    for run in (results["fp8", False], results["fp8", True]):
        # FP8's rounding of the bf16 path: 2-5% here (random data, two layers), where compiling bf16 moves it < 0.6%
        for got, expected in zip([run[0], run[1], *run[2]], [bf16[0], bf16[1], *bf16[2]]):
            assert 0.01 < relative_error(got, expected) < 0.08
    for _, _, _, saved in (results["fp8", False], results["fp8", True]):
        assert not [t for t in saved if t.is_floating_point() and t.numel() >= 256 * 384]

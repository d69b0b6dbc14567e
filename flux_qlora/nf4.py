"""NF4 linear layers that `torch.compile` turns into plain GPU kernels.

bitsandbytes' `Linear4bit` runs each matmul through its Python layer (quant state handling, an autograd
Function, two dequantization kernels because of double quantization, then the GEMM): ~230 us of CPU per call,
~1000 calls per Flux training step, so the step waits on the CPU (BENCHMARKS.md). Here the same packed weights
and scales are dequantized with ordinary torch ops, which inductor fuses into one kernel per weight feeding
cuBLAS, and a small autograd Function keeps the backward from saving the bf16 weight: it dequantizes again,
as bitsandbytes does. The storage is bitsandbytes' own (`Params4bit` and its `QuantState`), shared, not copied,
so loading, saving, LoRA merging and the eager path are unchanged.
"""

from __future__ import annotations

import functools

import bitsandbytes as bnb
import torch
from torch import nn


def block_scales(absmax_q: torch.Tensor, absmax_code: torch.Tensor, absmax_scale: torch.Tensor,
                 absmax_offset: torch.Tensor, blocksize2: int) -> torch.Tensor:
    """Each block's fp32 scale: its 8-bit code, scaled per `blocksize2` blocks, plus the offset."""
    block_of_scale = torch.arange(absmax_q.numel(), device=absmax_q.device) // blocksize2
    return absmax_code[absmax_q.long()] * absmax_scale[block_of_scale] + absmax_offset


def dequantize_nf4(packed: torch.Tensor, absmax_q: torch.Tensor, absmax_code: torch.Tensor,
                   absmax_scale: torch.Tensor, absmax_offset: torch.Tensor, code: torch.Tensor,
                   shape: tuple[int, int], blocksize: int, blocksize2: int, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' double-quantized NF4 layout, in torch ops: two 4-bit codes per byte (high nibble first),
    one 8-bit scale per `blocksize` weights, itself scaled per `blocksize2` scales plus an offset."""
    absmax = block_scales(absmax_q, absmax_code, absmax_scale, absmax_offset, blocksize2)
    return scaled_codes(packed, code, absmax, shape, blocksize).to(dtype)


def scaled_codes(packed: torch.Tensor, code: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int],
                 blocksize: int) -> torch.Tensor:
    """The fp32 weight of `shape` whose 4-bit codes are `packed` (two per byte, high nibble first), each block of
    `blocksize` codes times its entry of `scales`."""
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], dim=-1).view(scales.numel(), blocksize)
    return (code[codes.long()] * scales[:, None]).view(shape)


# The dequantization the compiled NF4 layers run (read at each call, so a test or bench/nf4_gemm.py can switch it).
DEQUANTIZE = dequantize_nf4

# --do_fp8_training on the NF4 base: the products with the NF4 weights on FP8 tensor cores (BENCHMARKS.md).
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor as e4m3 with one fp32 scale per row, (rows, 1): the left operand of a row-wise scaled GEMM,
    row-major as CUDA's `_scaled_mm` requires (a gradient can arrive transposed; the CPU's takes any layout)."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale


def nf4_as_fp8(packed: torch.Tensor, absmax_q: torch.Tensor, absmax_code: torch.Tensor, absmax_scale: torch.Tensor,
               absmax_offset: torch.Tensor, code: torch.Tensor, shape: tuple[int, int], blocksize: int,
               blocksize2: int, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 weight W (N, K) as e4m3, one byte per weight where bf16 takes two, with one fp32 scale per output of
    the product it feeds: per row n for x @ W.T, returned as (N, K) with scales (1, N); per column k for g @ W,
    returned as W.T laid out (K, N) (the column-major right operand `torch._scaled_mm` takes) with scales (1, K).
    The scales come from the block scales, no pass over the weights: NF4's largest code is 1.0, so a block's
    largest |weight| is its scale (for a column, the largest of its blocks' scales bounds it)."""
    rows, cols = shape
    absmax = block_scales(absmax_q, absmax_code, absmax_scale, absmax_offset, blocksize2).view(rows, cols // blocksize)
    largest = absmax.abs().amax(dim=0 if transposed else 1).clamp(min=1e-12)  # per column block, or per row
    ratio = absmax * FP8_MAX / (largest[None, :] if transposed else largest[:, None])  # <= FP8_MAX
    weight = scaled_codes(packed, code, ratio.view(-1), shape, blocksize).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if transposed:
        return weight.t().contiguous(), (largest / FP8_MAX).repeat_interleave(blocksize)[None, :]
    return weight, (largest / FP8_MAX)[None, :]


def fp8_gemm_runs_here(device: torch.device, shape: tuple[int, int], blocksize: int, blocksize2: int) -> bool:
    """Row-wise scaled FP8 GEMMs: CUDA from compute capability 8.9 (Ada, Hopper) or the CPU, sides multiples of 16,
    whole blocks per row, and the block scales in whole outer blocks (or one): every FLUX.1-dev layer. Inductor's
    CPU loop splitting (torch 2.13) drops the tail of a loop over the others' scales (a 384 x 64 weight's 384 blocks
    came out with 256 scales and 128 zeros), so they keep the default path."""
    rows, cols = shape
    blocks = rows * cols // blocksize
    if rows % 16 or cols % 16 or cols % blocksize or (blocks > blocksize2 and blocks % blocksize2):
        return False
    if device.type == "cpu":
        return cpu_fp8_gemm_runs()
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def cpu_fp8_gemm_runs() -> bool:
    """Whether torch's CPU `_scaled_mm` takes row-wise scales: torch 2.13's does, 2.11's takes one scale per
    operand ("only supports per-tensor scaling for CPU backend")."""
    ones = torch.ones(16, 16).to(FP8)
    try:
        torch._scaled_mm(ones, ones.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def _matmul_fp8(a: torch.Tensor, weight_fp8: tuple[torch.Tensor, torch.Tensor], fast_accum: bool) -> torch.Tensor:
    """a (..., K) @ the FP8 weight operand, rounded to a's dtype: a is scaled per row, the weight per output."""
    weight, weight_scale = weight_fp8
    a_fp8, a_scale = fp8_rows(a.reshape(-1, a.shape[-1]))
    out = torch._scaled_mm(a_fp8, weight.t(), scale_a=a_scale, scale_b=weight_scale, out_dtype=a.dtype,
                           use_fast_accum=fast_accum)
    return out.view(*a.shape[:-1], out.shape[-1])


class _NF4Matmul(torch.autograd.Function):
    """x @ dequant(W).T, saving only the packed weight for the backward (the bf16 weight would be 4x its size)."""

    @staticmethod
    def forward(ctx, x, packed, absmax_q, absmax_code, absmax_scale, absmax_offset, code, shape, blocksize,
                blocksize2, fp8):
        quant = (packed, absmax_q, absmax_code, absmax_scale, absmax_offset, code)
        ctx.save_for_backward(*quant)
        ctx.layout = (shape, blocksize, blocksize2, x.dtype)
        ctx.fp8 = fp8
        if fp8:  # fast accumulation in the forward, full in the gradient: as torchao's float8 training does
            return _matmul_fp8(x, nf4_as_fp8(*quant, shape, blocksize, blocksize2, transposed=False), True)
        return x @ DEQUANTIZE(*quant, shape, blocksize, blocksize2, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        shape, blocksize, blocksize2, _ = ctx.layout
        if ctx.fp8:
            weight_t = nf4_as_fp8(*ctx.saved_tensors, shape, blocksize, blocksize2, transposed=True)
            grad_in = _matmul_fp8(grad_out, weight_t, False)
        else:
            grad_in = grad_out @ DEQUANTIZE(*ctx.saved_tensors, *ctx.layout)
        return grad_in, None, None, None, None, None, None, None, None, None, None


class AutocastLinear4bit(bnb.nn.Linear4bit):
    """A `Linear4bit` that follows autocast as `nn.Linear` does: under autocast it returns the compute dtype.

    bitsandbytes returns the input's dtype, and under CUDA autocast the inputs are often fp32 (layer_norm runs in
    fp32): Flux's whole residual stream then turned fp32, doubling every activation and every checkpointed block
    input (measured: ~1.0 GiB of fp32 block inputs at 512x768 where bf16 takes half)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.compute_dtype)
        return super().forward(x)


class CompilableLinear4bit(AutocastLinear4bit):
    """A `Linear4bit` whose forward is torch ops over the same storage (see the module docstring)."""

    def setup_buffers(self, fp8: bool = False) -> None:
        state = self.weight.quant_state
        # Non-persistent: views of the Params4bit storage, never saved twice, not in state_dict.
        for name, tensor in (("nf4_packed", self.weight.data.view(torch.uint8)), ("nf4_absmax_q", state.absmax),
                             ("nf4_absmax_code", state.state2.code), ("nf4_absmax_scale", state.state2.absmax),
                             ("nf4_absmax_offset", torch.as_tensor(state.offset, device=state.absmax.device)),
                             ("nf4_code", state.code)):
            self.register_buffer(name, tensor, persistent=False)
        self.nf4_layout = (tuple(state.shape), state.blocksize, state.state2.blocksize)
        # --do_fp8_training: the products on FP8 tensor cores where this layer's GPU and shape have them
        self.nf4_fp8 = fp8 and fp8_gemm_runs_here(state.absmax.device, tuple(state.shape), state.blocksize,
                                                  state.state2.blocksize)

    def nf4_quant(self) -> tuple[torch.Tensor, ...]:
        """The packed weight and its quantization state, in the order `dequantize_nf4` and `nf4_as_fp8` take."""
        return (self.nf4_packed, self.nf4_absmax_q, self.nf4_absmax_code, self.nf4_absmax_scale,
                self.nf4_absmax_offset, self.nf4_code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        shape, blocksize, blocksize2 = self.nf4_layout
        fp8 = self.nf4_fp8 and dtype == torch.bfloat16  # the FP8 GEMMs write bf16
        out = _NF4Matmul.apply(x.to(dtype), *self.nf4_quant(), shape, blocksize, blocksize2, fp8)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


def compilable(layer: nn.Module) -> bool:
    """Double-quantized NF4 whose size is a whole number of blocks: the layout `dequantize_nf4` reads."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return (type(layer) in (bnb.nn.Linear4bit, AutocastLinear4bit) and state is not None and state.quant_type == "nf4"
            and state.nested and state.shape.numel() % state.blocksize == 0)


def make_nf4_compilable(model: nn.Module, fp8: bool = False) -> int:
    """Switches the model's NF4 layers to `CompilableLinear4bit` in place (after loading and moving to the device;
    LoRA wrappers keep working: they only call the layer), with `fp8` their products on FP8 tensor cores in bf16
    runs where `fp8_gemm_runs_here`. Returns the number of layers switched.

    Compile them with AOTAutograd's common-subexpression elimination off (`torch._functorch.config.cse = False`):
    it would merge the backward's dequantization with the forward's and keep every bf16 weight for the backward.
    """
    count = 0
    for layer in model.modules():
        if compilable(layer):
            layer.__class__ = CompilableLinear4bit
            layer.setup_buffers(fp8)
            count += 1
    return count

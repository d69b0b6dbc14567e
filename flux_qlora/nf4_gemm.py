"""NF4 GEMMs that read the weight as 4-bit: the dequantization happens in the GEMM's tiles, in registers.

The compiled NF4 layers (`nf4.CompilableLinear4bit`) dequantize each weight to bf16 in memory, then cuBLAS reads it
back: three such passes per training step with checkpointing (forward, recompute, input gradient), ~47 ms of a
~200 ms step at 512x768 on an H100 (BENCHMARKS.md), where each pass writes 2 bytes per weight and reads them again.
These Triton kernels load a tile of packed codes (half a byte per weight) and its block scales, dequantize it
exactly as bitsandbytes does (code x block scale in fp32, rounded to the compute dtype), and feed it to the tensor
cores: `x @ W.T` for the forward and the recompute, `grad @ W` for the input gradient. No weight gradient: the
base is frozen.

An experiment for issue 18, opt-in with `FLUX_QLORA_NF4_GEMM=triton` until the GPU says it pays. The kernels are
torch custom ops, so `torch.compile` (and the selective checkpoint's recompute) keeps them as calls. On a machine
without a GPU, Triton's interpreter (`TRITON_INTERPRET=1`) runs them on CPU tensors; that is how the CPU tests
check them against bitsandbytes' own dequantization.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU wheels come without Triton: the torch-ops path is used
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the Triton GEMMs can run on `device`: Triton on a CUDA GPU, or its interpreter on the CPU."""
    return triton is not None and (device.type == "cuda" or INTERPRETED)


if triton is not None:
    # INTERPRETER: numpy, under Triton's interpreter, has no bf16: it multiplies bf16 tiles as integers and rounds
    # fp32 to bf16 by truncation. There the weights are rounded by hand and the tiles, already rounded, widened to
    # fp32 for tl.dot; on a GPU the tensor cores take them as they are. Same numbers, other instructions.
    #
    # A few tile shapes for Flux's GEMMs (M = tokens: 1.6-4.6 k; N, K: 3,072-15,360); one for the interpreter.
    # Each program dequantizes its weight tiles itself, so a weight is dequantized once per BLOCK_M rows: about as
    # many ALU operations per weight as the tensor cores need clocks for BLOCK_M = 128 rows of it; 256-row tiles
    # halve that share.
    _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4)] if INTERPRETED else [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                 (128, 128, 128, 8, 3), (64, 128, 64, 4, 4)]
    ]

    @triton.jit
    def _dequantize_tile(packed, absmax_q, absmax_code, absmax_scale, offset, code, rows, k_start, K,
                         DTYPE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                         BLOCKSIZE2: tl.constexpr, INTERPRETER: tl.constexpr):
        """W[rows, k_start:k_start + COLS] of the row-major (N, K) weight, in DTYPE: two codes per byte, high
        nibble first; one 8-bit scale per BLOCKSIZE weights, scaled per BLOCKSIZE2 scales plus the offset."""
        byte_index = rows[:, None] * (K // 2) + k_start // 2 + tl.arange(0, COLS // 2)[None, :]
        byte = tl.load(packed + byte_index).to(tl.int32)
        nibbles = tl.reshape(tl.join(byte >> 4, byte & 0xF), (ROWS, COLS))  # (.., j, 2) -> even index high nibble
        values = tl.load(code + nibbles)
        block = rows[:, None] * (K // BLOCKSIZE) + k_start // BLOCKSIZE + tl.arange(0, COLS // BLOCKSIZE)[None, :]
        scale = (tl.load(absmax_code + tl.load(absmax_q + block).to(tl.int32))
                 * tl.load(absmax_scale + block // BLOCKSIZE2) + tl.load(offset))
        weights = tl.reshape(tl.reshape(values, (ROWS, COLS // BLOCKSIZE, BLOCKSIZE)) * scale[:, :, None],
                             (ROWS, COLS))
        return _round(weights, DTYPE, INTERPRETER)

    @triton.jit
    def _round(values, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
        """fp32 to DTYPE, to nearest even (by hand under the interpreter, see INTERPRETER above)."""
        if INTERPRETER and DTYPE == tl.bfloat16:
            bits = values.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return values.to(DTYPE)

    @triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
    @triton.jit
    def _x_wt_kernel(x, packed, absmax_q, absmax_code, absmax_scale, offset, code, out, M, N, K, stride_xm,
                     stride_om, DTYPE: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                     INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out (M, N) = x (M, K) @ W.T, W (N, K) in NF4; N and K whole multiples of the tiles."""
        rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            x_tile = tl.load(x + rows_m[:, None] * stride_xm + (k_start + cols)[None, :],
                             mask=rows_m[:, None] < M, other=0.0)
            w_tile = _dequantize_tile(packed, absmax_q, absmax_code, absmax_scale, offset, code, rows_n, k_start, K,
                                      DTYPE, BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, INTERPRETER)
            if INTERPRETER:
                x_tile, w_tile = x_tile.to(tl.float32), w_tile.to(tl.float32)
            acc = tl.dot(x_tile, tl.trans(w_tile), acc)
        tl.store(out + rows_m[:, None] * stride_om + rows_n[None, :], _round(acc, DTYPE, INTERPRETER),
                 mask=rows_m[:, None] < M)

    @triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
    @triton.jit
    def _g_w_kernel(g, packed, absmax_q, absmax_code, absmax_scale, offset, code, out, M, N, K, stride_gm,
                    stride_om, DTYPE: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                    INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out (M, K) = g (M, N) @ W, W (N, K) in NF4 (the input gradient); N and K whole multiples of the tiles."""
        rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k_start = tl.program_id(1) * BLOCK_K
        cols_n = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n_start in range(0, N, BLOCK_N):
            g_tile = tl.load(g + rows_m[:, None] * stride_gm + (n_start + cols_n)[None, :],
                             mask=rows_m[:, None] < M, other=0.0)
            w_tile = _dequantize_tile(packed, absmax_q, absmax_code, absmax_scale, offset, code, n_start + cols_n,
                                      k_start, K, DTYPE, BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, INTERPRETER)
            if INTERPRETER:
                g_tile, w_tile = g_tile.to(tl.float32), w_tile.to(tl.float32)
            acc = tl.dot(g_tile, w_tile, acc)
        tl.store(out + rows_m[:, None] * stride_om + (k_start + tl.arange(0, BLOCK_K))[None, :],
                 _round(acc, DTYPE, INTERPRETER), mask=rows_m[:, None] < M)

    _TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def supports(shape: tuple[int, int], blocksize: int, dtype: torch.dtype) -> bool:
    """The weights the kernels take: both sides whole multiples of every tile (256) and of the scale block."""
    return dtype in (torch.bfloat16, torch.float16) and all(side % 256 == 0 for side in shape) and 256 % blocksize == 0


def _launch(kernel, a: torch.Tensor, quant: tuple[torch.Tensor, ...], shape: tuple[int, int], out_features: int,
            grid_cols, blocksize: int, blocksize2: int) -> torch.Tensor:
    a = a if a.stride(-1) == 1 else a.contiguous()
    out = a.new_empty(a.shape[0], out_features)
    if not a.shape[0]:
        return out
    n, k = shape
    kernel[lambda meta: (triton.cdiv(a.shape[0], meta["BLOCK_M"]), grid_cols(meta))](
        a, *quant, out, a.shape[0], n, k, a.stride(0), out.stride(0), DTYPE=_TL_DTYPES[a.dtype],
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, INTERPRETER=INTERPRETED)
    return out


@torch.library.custom_op("flux_qlora::nf4_x_wt", mutates_args=())
def nf4_x_wt(x: torch.Tensor, packed: torch.Tensor, absmax_q: torch.Tensor, absmax_code: torch.Tensor,
             absmax_scale: torch.Tensor, absmax_offset: torch.Tensor, code: torch.Tensor, n: int, k: int,
             blocksize: int, blocksize2: int) -> torch.Tensor:
    """x (M, k) @ W.T for the NF4 weight W (n, k): (M, n)."""
    quant = (packed, absmax_q, absmax_code, absmax_scale, absmax_offset, code)
    return _launch(_x_wt_kernel, x, quant, (n, k), n, lambda meta: n // meta["BLOCK_N"], blocksize, blocksize2)


@nf4_x_wt.register_fake
def _(x, packed, absmax_q, absmax_code, absmax_scale, absmax_offset, code, n, k, blocksize, blocksize2):
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("flux_qlora::nf4_g_w", mutates_args=())
def nf4_g_w(g: torch.Tensor, packed: torch.Tensor, absmax_q: torch.Tensor, absmax_code: torch.Tensor,
            absmax_scale: torch.Tensor, absmax_offset: torch.Tensor, code: torch.Tensor, n: int, k: int,
            blocksize: int, blocksize2: int) -> torch.Tensor:
    """g (M, n) @ W for the NF4 weight W (n, k): (M, k), the input gradient of x @ W.T."""
    quant = (packed, absmax_q, absmax_code, absmax_scale, absmax_offset, code)
    return _launch(_g_w_kernel, g, quant, (n, k), k, lambda meta: k // meta["BLOCK_K"], blocksize, blocksize2)


@nf4_g_w.register_fake
def _(g, packed, absmax_q, absmax_code, absmax_scale, absmax_offset, code, n, k, blocksize, blocksize2):
    return g.new_empty(g.shape[0], k)

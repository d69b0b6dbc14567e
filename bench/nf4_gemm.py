"""The products with FLUX.1-dev's NF4 weights two ways, compiled as the trainer compiles them: the default
(dequantize to bf16, then cuBLAS) and --do_fp8_training's (dequantize straight to e4m3 with per-output scales,
quantize the activations per row, `torch._scaled_mm` on FP8 tensor cores). Issue 18's FP8 lever. On a GPU:

    python bench/nf4_gemm.py --tokens 1613 4608

For each weight (out x in) and token count: ms per forward product (x @ W.T) and per input gradient (g @ W) both
ways, and the FP8 result's relative L2 distance to the default's. Then, per training step, the sum over one step's
layers (19 double + 38 single blocks, three passes per weight with checkpointing: forward, recompute, input
gradient) of what each way costs. The modulation layers see one row per image (batch 1); every other layer is
timed at the total token count (the double blocks' text-side layers really see only the text tokens, so the sum
slightly overcounts both ways).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from flux_qlora import nf4
from flux_qlora.models import _nf4_linear, _nf4_weight
from flux_qlora.nf4 import block_scales, dequantize_nf4, make_nf4_compilable

# FLUX.1-dev's block linears (out, in): how many of each one step runs, and whether they see every token or one
# row per image. A double block has image and text attention (q, k, v, out: 8 of 3072x3072), two MLPs and two 6x
# modulations; a single block q, k, v, its MLP's input, its 3x modulation and proj_out over attention and MLP.
SHAPES = {
    (3072, 3072): (19 * 8 + 38 * 3, "tokens"),
    (12288, 3072): (19 * 2 + 38, "tokens"),
    (3072, 12288): (19 * 2, "tokens"),
    (18432, 3072): (19 * 2, "images"),
    (9216, 3072): (38, "images"),
    (3072, 15360): (38, "tokens"),
}


def dequantize_nf4_by_table(packed: torch.Tensor, absmax_q: torch.Tensor, absmax_code: torch.Tensor,
                            absmax_scale: torch.Tensor, absmax_offset: torch.Tensor, code: torch.Tensor,
                            shape: tuple[int, int], blocksize: int, blocksize2: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """The same weights, bit for bit, through a table per block of its 16 values (code x block scale in fp32,
    rounded to `dtype`, as bitsandbytes rounds them): per weight only a nibble and a lookup are left, no arithmetic,
    which inductor's rules may let it fuse into a Triton GEMM's prologue (max-autotune GEMMs): the table is half
    a byte per weight against the two bytes of a bf16 weight written and read again. A bench-only experiment, timed
    here as the "table" way (with TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 for the prologue fusion): `nf4.dequantize_nf4`
    stays the trainer's until a GPU run says otherwise."""
    absmax = block_scales(absmax_q, absmax_code, absmax_scale, absmax_offset, blocksize2)
    table = (absmax[:, None] * code[None, :]).to(dtype).view(-1)  # (block, nibble) -> value
    position = torch.arange(shape[0] * shape[1], device=packed.device).view(shape)
    byte = packed.view(-1)[position // 2]
    nibble = torch.where(position % 2 == 0, byte >> 4, byte & 0xF)  # high nibble first
    return table[(position // blocksize) * code.numel() + nibble.long()]


def nf4_layer(out_features: int, in_features: int, device: torch.device) -> nn.Module:
    linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16)
    layer = _nf4_linear(linear, torch.bfloat16)
    layer.weight = _nf4_weight(linear.weight.data, layer, device)
    model = nn.Sequential(layer)
    make_nf4_compilable(model)
    return model[0]


def milliseconds(call, repeats: int = 20) -> float:
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def measure(out_features: int, in_features: int, rows: int, device: torch.device) -> dict:
    layer = nf4_layer(out_features, in_features, device)
    quant = layer.nf4_quant()
    shape, blocksize, blocksize2 = layer.nf4_layout
    x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
    g = torch.randn(rows, out_features, device=device, dtype=torch.bfloat16)

    @torch.compile(fullgraph=True)
    def default_forward(x):
        return x @ dequantize_nf4(*quant, shape, blocksize, blocksize2, x.dtype).t()

    @torch.compile(fullgraph=True)
    def default_input_grad(g):
        return g @ dequantize_nf4(*quant, shape, blocksize, blocksize2, g.dtype)

    @torch.compile(fullgraph=True)
    def table_forward(x):
        return x @ dequantize_nf4_by_table(*quant, shape, blocksize, blocksize2, x.dtype).t()

    @torch.compile(fullgraph=True)
    def table_input_grad(g):
        return g @ dequantize_nf4_by_table(*quant, shape, blocksize, blocksize2, g.dtype)

    @torch.compile(fullgraph=True)
    def fp8_forward(x):
        return nf4._matmul_fp8(x, nf4.nf4_as_fp8(*quant, shape, blocksize, blocksize2, transposed=False), True)

    @torch.compile(fullgraph=True)
    def fp8_input_grad(g):
        return nf4._matmul_fp8(g, nf4.nf4_as_fp8(*quant, shape, blocksize, blocksize2, transposed=True), False)

    row = {"weight": f"{out_features}x{in_features}", "rows": rows}
    for name, default, others, arg in (("forward", default_forward, {"fp8": fp8_forward, "table": table_forward}, x),
                                       ("input_grad", default_input_grad,
                                        {"fp8": fp8_input_grad, "table": table_input_grad}, g)):
        expected = default(arg).float()
        row[f"{name}_default_ms"] = milliseconds(lambda: default(arg))  # noqa: B023 (called right here)
        for way, call in others.items():
            try:  # a way that fails at one shape is reported in its row; the other shapes still run
                got = call(arg).float()
            except RuntimeError as error:
                row[f"{name}_{way}_failed"] = str(error).splitlines()[0]
                row[f"{name}_{way}_ms"] = float("nan")
                continue
            row[f"{name}_{way}_error"] = float((got - expected).norm() / expected.norm())
            row[f"{name}_{way}_ms"] = milliseconds(lambda: call(arg))  # noqa: B023
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1613, 4608],
                        help="Rows of the products: 512x768 trains on 1,536 image + 77 text tokens, 1024x1024 on "
                             "4,096 + 512 with T5's 512.")
    parser.add_argument("--results", type=str, default=None, help="Write the rows as JSON here.")
    args = parser.parse_args()
    device = torch.device("cuda")
    if not (torch.cuda.is_available() and nf4.fp8_gemm_runs_here(device, (3072, 3072), 64, 256)):
        raise SystemExit("error: needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or higher)")
    torch._functorch.config.cse = False  # as the trainer compiles
    rows = []
    for tokens in args.tokens:
        step = {"default": 0.0, "fp8": 0.0}
        for (out_features, in_features), (count, kind) in SHAPES.items():
            row = measure(out_features, in_features, tokens if kind == "tokens" else 1, device)
            rows.append(row)
            print(json.dumps(row), flush=True)
            for way in step:  # with checkpointing: the forward twice (forward, recompute), the input gradient once
                step[way] += count * (2 * row[f"forward_{way}_ms"] + row[f"input_grad_{way}_ms"])
        rows.append({"tokens": tokens, **{f"step_ms_{way}": ms for way, ms in step.items()}})
        print(f"{tokens} tokens: one step's NF4 products " + ", ".join(
            f"{way} {ms:.1f} ms ({step['default'] / ms:.2f}x)" for way, ms in step.items()), flush=True)
    if args.results:
        with open(args.results, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

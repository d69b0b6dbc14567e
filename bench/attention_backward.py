#!/usr/bin/env python
"""Which SDPA backends train Flux's attention correctly: forward + backward at FLUX.1-dev's shapes, per backend,
input layout and dtype, against an fp32 math-kernel reference.

    python bench/attention_backward.py --tokens 2048 4608 --results /tmp/attention.json

Why: PyTorch's cuDNN attention was ~10% faster than flash at 1024x1024 in training, but with bf16 inputs its
backward gave all-zero LoRA updates (tiny model) or an illegal memory access (NF4 base) on the H100/H200
(BENCHMARKS.md), so the trainer defaults to flash. Suspects, each a case here: the layout diffusers hands SDPA
(B, S, H, D projections permuted to B, H, S, D: not contiguous), a grad_output whose strides differ from the
output's (what flattening the heads back produces; cuDNN 9.5.0 assumed them equal), and the sequence length.
Each case runs in its own process: an illegal memory access poisons the CUDA context for everything after it.

The cause, read in PyTorch's source (aten/src/ATen/native/cudnn/MHA.cpp, torch 2.11): the backward caches its cuDNN
graph under a key of q/k/v's shapes and strides and builds it with the first call's grad_output strides. In Flux the
double blocks' grad_output is contiguous per token (a row of 3072), the single blocks' a slice of a 5x wider
gradient (the attention output is concatenated with the MLP's): one graph then reads the other's memory. `--cache`
runs that pair in one process, both orders, with and without the fix the trainer applies (the single blocks'
gradient copied contiguous: `Family.give_attention_contiguous_gradients`); the block cases run the
cuDNN blocks with and without it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

HEADS, HEAD_DIM = 24, 128
TINY_HEADS, TINY_HEAD_DIM = 4, 16  # flux_qlora.tiny's transformer, where cuDNN gave all-zero LoRA updates
BACKENDS = ["cudnn", "flash", "efficient"]
LAYOUTS = {
    "bhsd": "q, k, v made as (B, H, S, D), contiguous",
    "bshd-permuted": "q, k, v made as (B, S, H*D) like the projections, viewed and permuted to (B, H, S, D)",
}
GRADS = {
    "contiguous": "grad_output contiguous in (B, H, S, D)",
    "from-flatten": "grad_output from (B, S, H*D) permuted back: the strides the heads' flatten produces",
}


def sdpa_grads(kernel, base: list, precision, grad_out) -> tuple[list, dict]:
    """q/k/v's gradients of one SDPA forward + backward with `kernel` (an SDPBackend) on `base` cast to `precision`
    (a permuted layout kept: .to() of a dense tensor keeps its strides), and the strides of q and of the output."""
    import torch
    from torch.nn.attention import sdpa_kernel

    leaves = [t.detach().to(precision).requires_grad_() for t in base]
    with sdpa_kernel(kernel):
        out = torch.nn.functional.scaled_dot_product_attention(*leaves)
    strides = {"q": list(leaves[0].stride()), "out": list(out.stride())}
    out.backward(grad_out)
    torch.cuda.synchronize()
    return [t.grad.float() for t in leaves], strides


def relative_errors(tested: list, reference: list) -> list[float]:
    return [round(float((t - r).norm() / r.norm()), 5) for t, r in zip(tested, reference)]


def run_case(backend: str, layout: str, grad: str, tokens: int, dtype: str, heads: int = HEADS,
             head_dim: int = HEAD_DIM) -> dict:
    """One forward + backward; gradients compared with the math kernel in fp32 on the same inputs."""
    import torch
    from torch.nn.attention import SDPBackend

    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}
    g = torch.Generator("cuda").manual_seed(0)
    dt = getattr(torch, dtype)

    def inputs() -> list[torch.Tensor]:
        if layout == "bhsd":
            made = [torch.randn(1, heads, tokens, head_dim, device="cuda", generator=g) for _ in range(3)]
        else:
            made = [torch.randn(1, tokens, heads * head_dim, device="cuda", generator=g)
                    .view(1, tokens, heads, head_dim).permute(0, 2, 1, 3) for _ in range(3)]
        return made

    base = inputs()
    if grad == "contiguous":
        grad_out = torch.randn(1, heads, tokens, head_dim, device="cuda", generator=g)
    else:
        grad_out = torch.randn(1, tokens, heads * head_dim, device="cuda", generator=g).view(
            1, tokens, heads, head_dim).permute(0, 2, 1, 3)

    reference, _ = sdpa_grads(SDPBackend.MATH, base, torch.float32, grad_out)
    try:
        tested, strides = sdpa_grads(kernels[backend], base, dt, grad_out.to(dt))
    except RuntimeError as error:
        return {"error": str(error).splitlines()[0][:300]}
    return {"rel_err_dq_dk_dv": relative_errors(tested, reference),
            "zero_grads": any(float(t.abs().max()) == 0 for t in tested), "strides": strides}


def run_cache_case(order: str, fixed: bool, tokens: int) -> dict:
    """Two cuDNN backward calls in one process on the same q/k/v shapes: grad_output as a double block's (a
    contiguous (B, S, H*D) gradient, heads split) and as a single block's (the first H*D of a (B, S, 5*H*D) one), in
    `order`; each call's gradients against the fp32 math kernel. `fixed`: the single block's copied contiguous first."""
    import torch
    from torch.nn.attention import SDPBackend

    g = torch.Generator("cuda").manual_seed(0)
    width = HEADS * HEAD_DIM
    base = [torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", generator=g) for _ in range(3)]
    rows = {"double": torch.randn(1, tokens, width, device="cuda", generator=g),
            "single": torch.randn(1, tokens, 5 * width, device="cuda", generator=g)}

    def grad_output(kind: str, precision: torch.dtype) -> torch.Tensor:
        # Cast before slicing: .to() of a slice (not dense) would return a contiguous copy, hiding the stride.
        row = rows[kind].to(precision)[..., :width]
        row = row.contiguous() if fixed else row
        return row.view(1, tokens, HEADS, HEAD_DIM).permute(0, 2, 1, 3)

    result = {}
    for kind in order.split("-"):
        reference, _ = sdpa_grads(SDPBackend.MATH, base, torch.float32, grad_output(kind, torch.float32))
        try:
            tested, strides = sdpa_grads(SDPBackend.CUDNN_ATTENTION, base, torch.bfloat16,
                                         grad_output(kind, torch.bfloat16))
        except RuntimeError as error:
            return {**result, kind: str(error).splitlines()[0][:300]}
        result[kind] = relative_errors(tested, reference)
    return result


def run_block_case(backend: str, tokens: int, compiled: bool, fixed: bool = False) -> dict:
    """A FLUX.1-dev-width double block and single block (random bf16 weights) through diffusers' attention
    dispatcher with `backend`, forward + backward under bf16 autocast as the trainer runs them; the input
    gradients compared with the same blocks on _native_math."""
    import torch
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    torch.manual_seed(0)
    dim, text = HEADS * HEAD_DIM, 512
    with torch.device("cuda"):
        double = FluxTransformerBlock(dim, HEADS, HEAD_DIM).to(torch.bfloat16)
        single = FluxSingleTransformerBlock(dim, HEADS, HEAD_DIM).to(torch.bfloat16)
        image = torch.randn(1, tokens - text, dim, dtype=torch.bfloat16)
        context = torch.randn(1, text, dim, dtype=torch.bfloat16)
        temb = torch.randn(1, dim, dtype=torch.bfloat16)
        angles = torch.randn(tokens, HEAD_DIM // 2)
    rotary = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))

    if fixed:
        from types import SimpleNamespace

        from flux_qlora.families.flux1 import FLUX1

        FLUX1.give_attention_contiguous_gradients(SimpleNamespace(single_transformer_blocks=[single]))

    def input_grads(name: str) -> list[torch.Tensor]:
        for block in (double, single):
            block.attn.set_attention_backend(name)
        run_double, run_single = (torch.compile(double), torch.compile(single)) if compiled else (double, single)
        x, c = image.clone().requires_grad_(), context.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            c_out, x_out = run_double(x, c, temb, image_rotary_emb=rotary)
            c_out, x_out = run_single(x_out, c_out, temb, image_rotary_emb=rotary)
        torch.cat([c_out, x_out], 1).float().square().mean().backward()
        torch.cuda.synchronize()
        return [x.grad.float(), c.grad.float()]

    reference = input_grads("_native_math")
    torch._dynamo.reset()
    try:
        tested = input_grads(backend)
    except RuntimeError as error:
        return {"error": str(error).splitlines()[0][:300]}
    return {"rel_err_dimage_dtext": relative_errors(tested, reference),
            "zero_grads": any(float(t.abs().max()) == 0 for t in tested)}


def errors_of(row: dict) -> list[float]:
    """A case's relative gradient errors (an error message counts as 1.0: wrong)."""
    if "cache_order" in row:
        return [e for kind in ("single", "double") for e in
                (row[kind] if isinstance(row.get(kind), list) else [1.0])]
    return row.get("rel_err_dq_dk_dv") or row["rel_err_dimage_dtext"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4608],
                        help="Sequence lengths: 2048 = 512x768 + 512 text tokens, 4608 = 1024x1024 + 512.")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--blocks", action="store_true",
                        help="Also: a Flux double + single block through diffusers' dispatcher (_native_cudnn, "
                             "_native_flash, _native_efficient), eager and compiled, as the trainer runs them.")
    parser.add_argument("--only_blocks", action="store_true",
                        help="Only the block cases (the SDPA ones were all correct on the H200, BENCHMARKS.md).")
    parser.add_argument("--tiny", action="store_true",
                        help="Also the SDPA cases at the tiny test model's shapes (4 heads of 16, 28 and 32 tokens), "
                             "where cuDNN's backward gave all-zero LoRA updates.")
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS,
                        help="The backends of the block and SDPA cases.")
    parser.add_argument("--cache", action="store_true",
                        help="First: the two grad_output strides of Flux's blocks through one cuDNN graph cache, both "
                             "orders, with and without the trainer's fix (the suspected cause, see above).")
    parser.add_argument("--case", type=str, default=None, help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    if args.case:
        kind, *fields = args.case.split(",")
        if kind == "cache":
            order, fixed, tokens = fields
            print(json.dumps(run_cache_case(order, fixed == "fixed", int(tokens))))
        elif kind == "block":
            backend, tokens, compiled, fixed = fields
            print(json.dumps(run_block_case(backend, int(tokens), compiled == "compiled", fixed == "fixed")))
        else:
            backend, layout, grad, tokens, dtype, heads, head_dim = fields
            print(json.dumps(run_case(backend, layout, grad, int(tokens), dtype, int(heads), int(head_dim))))
        return

    import torch

    shapes = [] if args.only_blocks else [(t, HEADS, HEAD_DIM) for t in args.tokens]
    if args.tiny:  # 64x48 on the tiny model: 12 image + 16 text tokens; 64x64: 16 + 16
        shapes += [(t, TINY_HEADS, TINY_HEAD_DIM) for t in (28, 32)]
    cases = [({"backend": b, "layout": lay, "grad_output": g, "tokens": t, "heads": h, "head_dim": hd, "dtype": d},
              f"sdpa,{b},{lay},{g},{t},{d},{h},{hd}")
             for (t, h, hd), d, b, lay, g in itertools.product(shapes, args.dtypes, args.backends, LAYOUTS, GRADS)]
    if args.blocks or args.only_blocks:  # first: the open question (BENCHMARKS.md); cuDNN with and without the fix
        cases = [({"block_backend": f"_native_{b}", "tokens": t, "compiled": c, "fixed": f},
                  f"block,_native_{b},{t},{c},{f}")
                 for t, b, c in itertools.product(args.tokens, args.backends, ["eager", "compiled"])
                 for f in (["unfixed", "fixed"] if b == "cudnn" else ["unfixed"])] + cases
    if args.cache:
        cases = [({"cache_order": o, "fixed": f, "tokens": t}, f"cache,{o},{f},{t}")
                 for t, o, f in itertools.product(args.tokens, ["single-double", "double-single"],
                                                  ["unfixed", "fixed"])] + cases
    rows = []
    for fields, case in cases:
        try:  # a hung kernel costs this case, not the run
            child = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True,
                                   timeout=150, env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
        except subprocess.TimeoutExpired:
            rows.append({**fields, "error": "timed out after 150 s"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        lines = child.stdout.strip().splitlines()
        outcome = json.loads(lines[-1]) if child.returncode == 0 and lines else {
            "error": f"exit {child.returncode}: {(child.stderr.strip().splitlines() or ['?'])[-1][:300]}"}
        rows.append({**fields, **outcome})
        print(json.dumps(rows[-1]), flush=True)
    report = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "gpu": torch.cuda.get_device_name(), "layouts": LAYOUTS, "grads": GRADS, "cases": rows}
    if args.results:
        args.results.write_text(json.dumps(report, indent=2))
    bad = [r for r in rows if "error" in r or r.get("zero_grads") or max(errors_of(r)) > 0.05]
    print(f"{len(rows) - len(bad)} of {len(rows)} cases correct (relative gradient error <= 5% of fp32 math)")
    for r in bad:
        print("  wrong:", json.dumps(r))


if __name__ == "__main__":
    main()

"""How the transformer's blocks run in training and serving: which blocks recompute their activations (and the
selective checkpoint policy they recompute under), regional compilation, the attention backend (and the cuDNN
gradient workaround), and FP8 compute. Loading lives in models.py."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from flux_qlora.errors import UserError
from flux_qlora.models import repeated_blocks

logger = logging.getLogger(__name__)

# FP8 GEMMs pay (and keep accuracy) only where both sides of the weight are wide: the output layer (3072 -> 64,
# the velocity itself) would spend more on quantizing its input than its tiny GEMM saves.
FP8_MIN_FEATURES = 1024


def route_block_calls(transformer: nn.Module, checkpoint_interval: int = 0, compiled: bool = False) -> None:
    """Every block call of a training forward goes through here: every `checkpoint_interval`-th block (1: all,
    0: none) recomputes its activations in the backward, and under `compiled` each block kind sees one kind of
    input, so it compiles once.

    Checkpointing all 57 Flux blocks costs a third forward pass; with memory to spare, checkpointing every 2nd or
    3rd block keeps most of the saving for part of the cost. `compiled`: the checkpoint itself goes through
    torch.compile, so each block's recomputation is fused into its compiled backward (one compiled call per
    block and direction instead of three, none of the checkpoint's Python bookkeeping at run time).
    """
    from torch.utils.checkpoint import checkpoint

    blocks = repeated_blocks(transformer)
    checkpointed = {id(block) for i, block in enumerate(blocks) if checkpoint_interval and i % checkpoint_interval == 0}

    def run_checkpointed(block, *args):
        # The blocks draw no random numbers (no dropout): no RNG state to save and restore per block.
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)

    if compiled:
        run_checkpointed = compile_checkpointed(checkpoint_recomputing_everything)

    def call_block(block, *args):
        if compiled:
            args = streams_alike(args)
        if id(block) in checkpointed:
            return run_checkpointed(block, *args)
        return block(*args)

    transformer.enable_gradient_checkpointing(call_block)


def checkpoint_recomputing_everything(block: nn.Module, *args):
    """`block(*args)` under a selective checkpoint that keeps nothing but the inputs. Compiled, a plain checkpoint
    lets the partitioner keep the GEMM outputs (+5 GiB at 512x768, measured); this policy makes it keep only the
    block's inputs, as the eager checkpoint does. (Keeping the one-row modulation products' outputs instead of
    recomputing them measured 1.03x at 512x768 on the H200, within the spread between runs: removed; commit
    012cbce has it.)"""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def recompute_everything(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_RECOMPUTE

    return checkpoint(block, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, recompute_everything))


def compile_checkpointed(run: Callable, cse: bool = True, **compile_kwargs) -> Callable:
    """`run` (a block under the selective checkpoint) compiled once per input shape, with AOTAutograd's
    common-subexpression elimination on inside it (`cse`; off for the rest of the process: `configure_compile`).
    There the NF4 dequantization of the recomputed forward and the backward's become one: two passes over the
    weights per step instead of three, no weight kept between forward and backward (test_nf4). Measured on the
    H200 at 1024x1024: 0.442 vs 0.449 s/step, 7.87 vs 7.99 GiB, the same final loss to 1e-6 (BENCHMARKS.md).
    The switch is read when the graphs are made, at the first call."""
    compiled = torch.compile(run, dynamic=False, **compile_kwargs)
    if not cse:
        return compiled

    def run_with_cse(*args):
        with torch._functorch.config.patch(cse=True):
            return compiled(*args)

    return run_with_cse


def streams_alike(args: tuple) -> tuple:
    """A block's two residual streams (image and text tokens), as every block of its kind gets them in training:
    contiguous and requiring grad. The first double block's come from frozen embedders (no grad) and the first
    single block's as slices of a longer sequence (another batch stride); each difference was a compilation of its
    own (4 graphs instead of 2, compile time measured: BENCHMARKS.md). The price: the first block's input
    gradients, computed and dropped."""
    def alike(tensor):
        if tensor is None:  # FLUX.2's single blocks: one joint stream, the text one None
            return None
        tensor = canonical_strides(tensor)
        return tensor if tensor.requires_grad else tensor.detach().requires_grad_()

    return (*map(alike, args[:2]), *args[2:])


def canonical_strides(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous with the strides of a fresh tensor, the batch dimension's too (dynamo guards it even at batch 1,
    where a slice of a longer sequence has another): a view, no copy, when already contiguous."""
    return tensor.contiguous().flatten().view(tensor.shape)


def compile_blocks_for_inference(transformer: nn.Module) -> None:
    """Regional compilation as diffusers' `compile_repeated_blocks(fullgraph=True)` does it (each block's forward
    compiled, one graph per block kind), with the single blocks' streams given canonical strides first, outside
    the graph: the first single block gets whole tensors, the others slices of the previous block's joint
    sequence, and that difference cost a second single-block graph in the warm-up (3 graphs instead of 2)."""
    def canonical_streams(module, args, kwargs):
        return (tuple(canonical_strides(a) if i < 2 and a is not None else a for i, a in enumerate(args)),
                {k: canonical_strides(v) if k in ("hidden_states", "encoder_hidden_states") and v is not None else v
                 for k, v in kwargs.items()})

    for block in repeated_blocks(transformer):
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False)
    for block in transformer.single_transformer_blocks:
        block.register_forward_pre_hook(canonical_streams, with_kwargs=True)


def compile_blocks(transformer: nn.Module, fp8: bool = False) -> None:
    """Regional compilation: each block through `torch.compile` (blocks of a kind share one graph). NF4 layers
    first become `CompilableLinear4bit`, so the blocks compile to fused kernels instead of calls into
    bitsandbytes' Python layer (which needs AOTAutograd's CSE off: `configure_compile`); with `fp8`
    (--do_fp8_training) their products run on FP8 tensor cores."""
    from flux_qlora import nf4

    switched = nf4.make_nf4_compilable(transformer, fp8=fp8)
    blocks = repeated_blocks(transformer)
    for block in blocks:
        block.compile(dynamic=False)
    logger.info("Compiling %d blocks (%d NF4 layers as fused torch ops)", len(blocks), switched)
    if fp8 and switched:
        on_fp8 = sum(getattr(layer, "nf4_fp8", False) for layer in transformer.modules())
        logger.info("--do_fp8_training: %d of the %d NF4 layers multiply on FP8 tensor cores in bf16 runs (the "
                    "others have no FP8 GEMM here: nf4.fp8_gemm_runs_here)", on_fp8, switched)


def set_attention_backend(transformer: nn.Module, backend: str | None, training: bool = False,
                          family=None) -> None:
    """diffusers' attention dispatcher: e.g. _native_flash / _native_cudnn (PyTorch's kernels), flash, _flash_3
    (where installed). None keeps PyTorch's SDPA choice. Training with cuDNN: `family`'s blocks hand its backward
    contiguous gradients (`Family.give_attention_contiguous_gradients`)."""
    if not backend:
        return
    try:
        transformer.set_attention_backend(backend)
    except (ValueError, RuntimeError, ImportError) as error:
        raise UserError(f"--attention_backend {backend}: {error}") from None
    if training and backend == "_native_cudnn":
        family.give_attention_contiguous_gradients(transformer)


class _ContiguousGradient(torch.autograd.Function):
    """The identity, whose backward hands on its gradient contiguous."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, whose gradient is handed on contiguous (a no-op copy where it is already)."""
    return _ContiguousGradient.apply(tensor)


def fp8_eligible(module: nn.Module, name: str) -> bool:
    """The one FP8 layer rule (training and inference): a plain linear, not a LoRA factor, at least
    `FP8_MIN_FEATURES` wide on both sides, with sizes the FP8 GEMMs take (multiples of 16)."""
    return (isinstance(module, nn.Linear) and "lora_" not in name
            and min(module.in_features, module.out_features) >= FP8_MIN_FEATURES
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def enable_fp8_training(transformer: nn.Module) -> None:
    """torchao float8 training for the frozen base's big linear layers (a bf16 base on an FP8-capable GPU, checked
    by the caller with `check_fp8_device`): the layers `fp8_eligible` picks; NF4 layers are not nn.Linear."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    swapped = []

    def eligible(module: nn.Module, fqn: str) -> bool:
        if type(module) is nn.Linear and fp8_eligible(module, fqn):
            swapped.append(fqn)
            return True
        return False

    # pad_inner_dim: token counts such as 77 text + 1536 image tokens are not multiples of 16, which the FP8
    # GEMMs of the backward need.
    convert_to_float8_training(transformer, module_filter_fn=eligible, config=Float8LinearConfig(pad_inner_dim=True))
    logger.info("FP8 training (torchao) on %d linear layers", len(swapped))


def configure_compile(graphs_per_block: int) -> None:
    """The process-wide compile settings of a training run, set once before anything compiles.

    AOTAutograd's common-subexpression elimination goes off for the process: it merged the backward's NF4
    dequantization with the forward's and then kept every block's bf16 weights for the backward (+21 GiB on
    FLUX.1-dev at 512x768, measured); the checkpointed blocks turn it back on inside their own graphs, where it pays
    (`compile_checkpointed`). Each bucket size is a graph of its own (dynamic=False), and so is each size in no_grad
    (eval loss, sample images): past dynamo's limit of 8 per block a block would silently run eagerly, so the limit
    is raised to `graphs_per_block`."""
    torch._functorch.config.cse = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs_per_block)

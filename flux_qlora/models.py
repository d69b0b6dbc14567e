"""Loading Flux models: the text encoders, and the transformer quantized to NF4 with LoRA adapters on top.

The transformer is streamed tensor by tensor from its safetensors files into bitsandbytes `Linear4bit`
layers on the target device, so system RAM never holds the full bf16 model (~24 GB for FLUX.1-dev) and the
same code runs on a GPU and, in the tests, on the CPU (diffusers' `BitsAndBytesConfig` route refuses to run
without CUDA). Pre-quantized NF4 checkpoints (a folder saved with bitsandbytes NF4 weights) load directly.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flux_qlora.errors import UserError

logger = logging.getLogger(__name__)

# The one dtype table: infer.py's --dtype names, and accelerate's --mixed_precision ("no" computes in fp32).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "no": torch.float32}


def base_precision_label(base_precision: str, fp8_training: bool) -> str:
    """What the frozen base trained in, as the model card says it and infer.py compares it: NF4, FP8 or bf16."""
    if base_precision == "nf4":
        return "NF4"
    return "FP8" if fp8_training else "bf16"


# FP8 GEMMs pay (and keep accuracy) only where both sides of the weight are wide: the output layer (3072 -> 64,
# the velocity itself) would spend more on quantizing its input than its tiny GEMM saves.
FP8_MIN_FEATURES = 1024
# FLUX.1-dev's transformer config (its config.json), for the memory plan's tests and the benchmarks' random model.
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# Only the repeated blocks hold the bulk (>99%) of the weights; the small embedders and the output layer stay
# in the weight dtype, as in the NF4 checkpoints the diffusers team publishes.
QUANTIZED_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def looks_like_hub_id(name: str) -> bool:
    """owner/name, not a path: what the Hub accepts as a repository id."""
    return not name.startswith((".", "/")) and name.count("/") == 1


def _check_model_source(name_or_path: str) -> None:
    if not Path(name_or_path).exists() and not looks_like_hub_id(name_or_path):
        raise UserError(f"--pretrained_model_name_or_path {name_or_path}: no such folder, and not a Hub id "
                        "(owner/name) either.")


# ---------------------------------------------------------------------------------------------------------------
# Text encoders (compute_embeddings.py only: the trainer never loads them)
# ---------------------------------------------------------------------------------------------------------------


def load_text_pipeline(name_or_path: str, device: str, t5_8bit: bool = False, revision: str | None = None,
                       variant: str | None = None, cache_dir: str | None = None, dtype: torch.dtype | None = None):
    """A FluxPipeline holding only the tokenizers and text encoders, on `device` (in `dtype`; default bf16 on a
    GPU, else fp32)."""
    from diffusers import FluxPipeline

    _check_model_source(name_or_path)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    common = {"revision": revision, "variant": variant, "cache_dir": cache_dir}
    extra = {}
    if t5_8bit:
        if not device.startswith("cuda"):
            raise UserError("--t5_8bit needs a CUDA GPU (bitsandbytes 8-bit inference); drop the flag on the CPU.")
        from transformers import BitsAndBytesConfig, T5EncoderModel

        extra["text_encoder_2"] = T5EncoderModel.from_pretrained(
            name_or_path, subfolder="text_encoder_2", dtype=dtype,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True), **common)
    pipe = FluxPipeline.from_pretrained(name_or_path, transformer=None, vae=None, dtype=dtype, **common, **extra)
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        if not getattr(module, "is_loaded_in_8bit", False):
            module.to(device)
    pipe.set_progress_bar_config(disable=True)
    logger.info("Text encoders loaded on %s (%s)", device, str(dtype).removeprefix("torch."))
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# The transformer, streamed into NF4
# ---------------------------------------------------------------------------------------------------------------


def _weight_index(folder: Path, variant: str | None) -> list[Path]:
    infix = f".{variant}" if variant else ""
    index = folder / f"diffusion_pytorch_model{infix}.safetensors.index.json"
    if index.exists():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / f"diffusion_pytorch_model{infix}.safetensors"
    if single.exists():
        return [single]
    raise UserError(f"no safetensors weights in {folder} (looked for {index.name} and {single.name})"
                    + ("; check --variant." if variant else "."))


def _local_transformer_folder(path: Path) -> Path:
    """A pipeline folder's `transformer/`, or the folder itself (a transformer folder)."""
    return path / "transformer" if (path / "transformer" / "config.json").exists() else path


def _flux_config(folder: Path) -> dict:
    """The config.json of a transformer folder, refused unless it is a Flux transformer's."""
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json: point --pretrained_model_name_or_path at a Flux pipeline "
                        "folder (with transformer/) or a transformer folder.")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") not in (None, "FluxTransformer2DModel"):
        raise UserError(f"{folder} holds a {config['_class_name']}, not a FluxTransformer2DModel.")
    return config


def resolve_transformer(name_or_path: str, revision=None, variant=None, cache_dir=None) -> tuple[dict, list[Path]]:
    """(config, weight files) of a Flux transformer: a pipeline folder or Hub id (its `transformer/`), or a
    transformer folder. Only the transformer's files are downloaded."""
    path = Path(name_or_path)
    if path.is_dir():
        folder = _local_transformer_folder(path)
    else:
        _check_model_source(name_or_path)
        from huggingface_hub import snapshot_download

        # Try a pipeline repo's transformer/ first, then a repo holding just a transformer.
        folder = None
        for sub in ("transformer", ""):
            pattern = f"{sub}/*" if sub else "*"
            root = Path(snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir,
                                          allow_patterns=[f"{pattern}.json", f"{pattern}.safetensors"]))
            if (root / sub / "config.json").exists():
                folder = root / sub
                break
        if folder is None:
            raise UserError(f"{name_or_path} holds no Flux transformer (no transformer/config.json or config.json).")
    return _flux_config(folder), _weight_index(folder, variant)


def read_transformer_config(name_or_path: str, revision=None, cache_dir=None) -> dict:
    """Just the transformer's config.json (a pipeline's `transformer/` or a transformer folder or repo): what the
    memory plan and the attention check need before any weight is downloaded or loaded."""
    path = Path(name_or_path)
    if path.is_dir():
        return _flux_config(_local_transformer_folder(path))
    _check_model_source(name_or_path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        file = hf_hub_download(name_or_path, "config.json", subfolder="transformer", revision=revision,
                               cache_dir=cache_dir)
    except EntryNotFoundError:
        file = hf_hub_download(name_or_path, "config.json", revision=revision, cache_dir=cache_dir)
    return _flux_config(Path(file).parent)


def _nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    from flux_qlora.nf4 import AutocastLinear4bit

    layer = AutocastLinear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                               quant_storage=torch.uint8, device="meta")
    # On CPUs with AVX512-bf16, bnb repacks the weight in place the first time the layer runs in eval mode,
    # which then breaks training and LoRA merging on it; one layout everywhere keeps CPU tests = GPU path.
    layer.support_avx512bf16_for_cpu = False
    return layer


def _block_linears(model: nn.Module) -> list[str]:
    """Names of the plain linear layers of the repeated blocks (the bulk of the weights), LoRA factors excluded."""
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n.startswith(QUANTIZED_PREFIXES) and ".lora_" not in n]


def _replace_linears_with_nf4(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Swaps the blocks' nn.Linear for empty NF4 `Linear4bit` layers (weights arrive later); returns their names."""
    names = _block_linears(model)
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _nf4_linear(getattr(parent, child), compute_dtype))
    return names


def _nf4_weight(weight: torch.Tensor, module: nn.Module, device: torch.device):
    """Quantizes a weight to NF4 on `device` (double quantization of the block scales saves ~0.5 GB on Flux)."""
    import bitsandbytes as bnb

    # bnb quantizes when an unquantized Params4bit moves to a device: move it there in compute dtype first.
    return bnb.nn.Params4bit(weight.to(device, module.compute_dtype), requires_grad=False, quant_type="nf4",
                             compress_statistics=True, quant_storage=torch.uint8, module=module).to(device)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, name = key.rsplit(".", 1)
    module = model.get_submodule(module_name)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def _load_file_into(model, file: Path, quantized: set[str], device, dtype) -> None:
    """Streams one safetensors file into `model`: the layers named in `quantized` become NF4."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        # Pre-quantized files hold `<layer>.weight` (packed uint8) plus `<layer>.weight.<quant state>` entries.
        quant_stats = defaultdict(dict)
        for key in keys:
            if ".weight." in key:
                layer, stat = key.split(".weight.", 1)
                quant_stats[layer][f"weight.{stat}"] = f.get_tensor(key)
        for key in keys:
            if ".weight." in key:
                continue
            layer = key.rsplit(".", 1)[0]
            if layer in quant_stats and layer not in quantized:
                raise UserError(f"{file} holds NF4-quantized weights ({layer}): load it with --base_precision nf4.")
            tensor = f.get_tensor(key)
            if layer in quantized and key.endswith(".weight"):
                module = model.get_submodule(layer)
                if layer in quant_stats:
                    module.weight = bnb.nn.Params4bit.from_prequantized(
                        tensor, {k.removeprefix("weight."): v for k, v in quant_stats[layer].items()},
                        device=device, module=module)
                else:
                    module.weight = _nf4_weight(tensor, module, device)
            else:
                _set_tensor(model, key, tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype))


def load_transformer(name_or_path: str, device: str | torch.device, weight_dtype: torch.dtype,
                     revision=None, variant=None, cache_dir=None, nf4: bool = True):
    """The Flux transformer with its blocks' linear layers in NF4 (all in `weight_dtype` with `nf4=False`) and
    everything else in `weight_dtype`."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from tqdm.auto import tqdm

    config, files = resolve_transformer(name_or_path, revision, variant, cache_dir)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    quantized = set(_replace_linears_with_nf4(model, weight_dtype)) if nf4 else set()
    device = torch.device(device)
    for file in tqdm(files, desc="Loading transformer", disable=len(files) < 2):
        _load_file_into(model, file, quantized, device, weight_dtype)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise UserError(f"the transformer checkpoint in {files[0].parent} lacks {len(missing)} weights "
                        f"(e.g. {missing[0]}): is it a Flux transformer matching its config.json?")
    model.requires_grad_(False)
    model.eval()
    logger.info("Transformer loaded on %s: %d linear layers in NF4, %.1f MiB of weights",
                device, len(quantized), module_bytes(model) / 2**20)
    return model


def load_vae(name_or_path: str, device: torch.device, dtype: torch.dtype, revision: str | None = None,
             variant: str | None = None, cache_dir: str | None = None):
    """The pipeline's VAE, frozen, on `device`."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", revision=revision, variant=variant,
                                        cache_dir=cache_dir, dtype=dtype)
    return vae.requires_grad_(False).to(device)


def quantize_to_nf4(model: nn.Module, device: str | torch.device) -> None:
    """Re-quantizes an in-memory transformer's block linears to NF4 in place (e.g. after fusing a LoRA) and moves
    it to `device`."""
    device = torch.device(device)
    for name in _block_linears(model):
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        nf4 = _nf4_linear(linear, linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16)
        nf4.weight = _nf4_weight(linear.weight.data, nf4, device)
        if linear.bias is not None:
            nf4.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
        setattr(parent, child, nf4)
    model.to(device)


def module_bytes(model: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, NF4 quantization states included."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def count_nf4_layers(model: nn.Module) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The 19 double-stream and 38 single-stream blocks of FLUX.1-dev, in the order the forward runs them."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


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


# AOTAutograd's common-subexpression elimination in the checkpointed blocks' graphs (process-wide it is off:
# train_qlora_flux.py). There the NF4 dequantization of the recomputed forward and the backward's become one: two
# passes over the weights per step instead of three, no weight kept between forward and backward (checked on the
# CPU: test_nf4), at the price of each block's bf16 weights held through its own backward. Opt-in until measured
# on the GPU (issue 18, BENCHMARKS.md).
CSE_IN_CHECKPOINTS = os.environ.get("FLUX_QLORA_CHECKPOINT_CSE") == "1"


# Keeping the outputs of thin products in the checkpointed blocks instead of recomputing them: the modulation
# layers' one row per image (36 KB per layer at batch 1) against a pass over their NF4 weights (3.2 B of FLUX.1-dev's
# 11.8 B) in every step's recomputation. Opt-in until measured on the GPU (issue 18, BENCHMARKS.md); read when the
# graphs are made.
SAVE_THIN_IN_CHECKPOINTS = os.environ.get("FLUX_QLORA_CHECKPOINT_SAVE_THIN") == "1"


def thin_product(op, args: tuple) -> bool:
    """A matrix product with at most 1/64 as many rows as its inner size (its output is at most 1/64 of its
    weight)."""
    aten = torch.ops.aten
    if op in (aten.mm.default, aten._scaled_mm.default):
        rows, inner = args[0].shape
    elif op is aten.addmm.default:
        rows, inner = args[1].shape
    else:
        return False
    return rows * 64 <= inner


def checkpoint_recomputing_everything(block: nn.Module, *args):
    """`block(*args)` under a selective checkpoint that keeps nothing but the inputs (with
    `SAVE_THIN_IN_CHECKPOINTS`, also the thin products' outputs). Compiled, a plain checkpoint lets the partitioner
    keep the GEMM outputs (+5 GiB at 512x768, measured); this policy makes it keep only the block's inputs, as the
    eager checkpoint does."""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def recompute_everything(ctx, op, *args, **kwargs):
        if SAVE_THIN_IN_CHECKPOINTS and thin_product(op, args):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.MUST_RECOMPUTE

    return checkpoint(block, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, recompute_everything))


def compile_checkpointed(run: Callable, cse: bool | None = None, **compile_kwargs) -> Callable:
    """`run` (a block under the selective checkpoint) compiled once per input shape, with AOTAutograd's CSE on if
    `cse` (default: `CSE_IN_CHECKPOINTS`); the switch is read when the graphs are made, at the first call."""
    compiled = torch.compile(run, dynamic=False, **compile_kwargs)
    if not (CSE_IN_CHECKPOINTS if cse is None else cse):
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
        return (tuple(canonical_strides(a) if i < 2 else a for i, a in enumerate(args)),
                {k: canonical_strides(v) if k in ("hidden_states", "encoder_hidden_states") else v
                 for k, v in kwargs.items()})

    for block in repeated_blocks(transformer):
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False)
    for block in transformer.single_transformer_blocks:
        block.register_forward_pre_hook(canonical_streams, with_kwargs=True)


def compile_blocks(transformer: nn.Module, fp8: bool = False) -> None:
    """Regional compilation: each block through `torch.compile` (blocks of a kind share one graph). NF4 layers
    first become `CompilableLinear4bit`, so the blocks compile to fused kernels instead of calls into
    bitsandbytes' Python layer (which needs AOTAutograd's CSE off: see train_qlora_flux.py); with `fp8`
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


def set_attention_backend(transformer: nn.Module, backend: str | None, training: bool = False) -> None:
    """diffusers' attention dispatcher: e.g. _native_flash / _native_cudnn (PyTorch's kernels), flash, _flash_3
    (where installed). None keeps PyTorch's SDPA choice."""
    if not backend:
        return
    try:
        transformer.set_attention_backend(backend)
    except (ValueError, RuntimeError, ImportError) as error:
        raise UserError(f"--attention_backend {backend}: {error}") from None
    if training and backend == "_native_cudnn":
        give_single_blocks_contiguous_attention_gradients(transformer)


class _ContiguousGradient(torch.autograd.Function):
    """The identity, whose backward hands on its gradient contiguous."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def give_single_blocks_contiguous_attention_gradients(transformer: nn.Module) -> None:
    """Works around PyTorch's cuDNN attention backward (torch 2.11, aten/src/ATen/native/cudnn/MHA.cpp): it caches
    the cuDNN graph it builds under a key of q/k/v's shapes and strides, but builds it with the first call's
    grad_output strides. A single block's attention output is concatenated with its MLP's, so its gradient arrives
    as a slice of a 5x wider one; a double block's arrives contiguous; both have the same q/k/v: one graph then reads
    the other's gradient with the wrong strides (our reading of the illegal memory access and the wrong LoRA
    gradients in BENCHMARKS.md; `bench/attention_backward.py --cache` checks it on a GPU). Copied contiguous, the
    single blocks' gradients have the double blocks' strides, so one graph serves both (the price: a copy of one
    (tokens x 3072) tensor per single block)."""
    def contiguous_gradient(module, inputs, output):
        return _ContiguousGradient.apply(output)

    for block in transformer.single_transformer_blocks:
        block.attn.register_forward_hook(contiguous_gradient)


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

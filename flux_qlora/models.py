"""Loading Flux models: the text encoders, and the transformer quantized to NF4 with LoRA adapters on top.

The transformer is streamed tensor by tensor from its safetensors files into bitsandbytes `Linear4bit`
layers on the target device, so system RAM never holds the full bf16 model (~24 GB for FLUX.1-dev) and the
same code runs on a GPU and, in the tests, on the CPU (diffusers' `BitsAndBytesConfig` route refuses to run
without CUDA). Pre-quantized NF4 checkpoints (a folder saved with bitsandbytes NF4 weights) load directly.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from flux_qlora import families
from flux_qlora.errors import UserError
from flux_qlora.families import Family
from flux_qlora.files import looks_like_hub_id
from flux_qlora.readers import open_safetensors, read_json

logger = logging.getLogger(__name__)

# The one dtype table: infer.py's --dtype names, and accelerate's --mixed_precision ("no" computes in fp32).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "no": torch.float32}


def quantized_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Where the layers NF4 takes are: the family's (`Family.quantized_prefixes`)."""
    return families.from_transformer_config(dict(model.config), "the transformer").quantized_prefixes


def _check_model_source(name_or_path: str) -> None:
    if not Path(name_or_path).exists() and not looks_like_hub_id(name_or_path):
        raise UserError(f"--pretrained_model_name_or_path {name_or_path}: no such folder, and not a Hub id "
                        "(owner/name) either.")


# ---------------------------------------------------------------------------------------------------------------
# Text encoders (compute_embeddings.py only: the trainer never loads them)
# ---------------------------------------------------------------------------------------------------------------


def load_text_pipeline(family: Family, name_or_path: str, device: str, quantize: str | None = None,
                       revision: str | None = None, variant: str | None = None, cache_dir: str | None = None,
                       dtype: torch.dtype | None = None):
    """A pipeline of `family` holding only the tokenizer(s) and text encoder(s), on `device` (in `dtype`; default
    bf16 on a GPU, else fp32); `quantize` ("8bit" or "nf4", bitsandbytes on a GPU) for the big text encoder."""
    _check_model_source(name_or_path)
    if quantize and not device.startswith("cuda"):
        raise UserError(f"--quantize_text_encoder {quantize} (or --t5_8bit) needs a CUDA GPU (bitsandbytes); drop it "
                        "on the CPU.")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    hub = {"revision": revision, "variant": variant, "cache_dir": cache_dir}
    pipe = family.load_text_pipeline(name_or_path, device, quantize, dtype, hub)
    pipe.set_progress_bar_config(disable=True)
    logger.info("%s text encoder(s) loaded on %s (%s%s)", family.label, device, str(dtype).removeprefix("torch."),
                f", {quantize}" if quantize else "")
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# The transformer, streamed into NF4
# ---------------------------------------------------------------------------------------------------------------


def _weight_index(folder: Path, variant: str | None) -> list[Path]:
    infix = f".{variant}" if variant else ""
    index = folder / f"diffusion_pytorch_model{infix}.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "weight index", "download the transformer again").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"weight index {index} has no weight_map: download the transformer again.")
        return sorted({folder / str(name) for name in weight_map.values()})
    single = folder / f"diffusion_pytorch_model{infix}.safetensors"
    if single.exists():
        return [single]
    raise UserError(f"no safetensors weights in {folder} (looked for {index.name} and {single.name})"
                    + ("; check --variant." if variant else "."))


def _local_transformer_folder(path: Path) -> Path:
    """A pipeline folder's `transformer/`, or the folder itself (a transformer folder)."""
    return path / "transformer" if (path / "transformer" / "config.json").exists() else path


def _flux_config(folder: Path) -> dict:
    """The config.json of a transformer folder, refused unless it is a FLUX.1 or FLUX.2 transformer's."""
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json: point --pretrained_model_name_or_path at a Flux pipeline "
                        "folder (with transformer/) or a transformer folder.")
    config = read_json(folder / "config.json", "transformer config", "download the transformer again")
    families.from_transformer_config(config, str(folder))  # refuses other transformers
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
    prefixes = quantized_prefixes(model)
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n.startswith(prefixes) and ".lora_" not in n]


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

    with open_safetensors(file, "transformer weights", "download the transformer again") as f:
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
    """The FLUX.1 or FLUX.2 transformer (its family read from its config) with its blocks' linear layers in NF4
    (all in `weight_dtype` with `nf4=False`) and everything else in `weight_dtype`."""
    from accelerate import init_empty_weights
    from tqdm.auto import tqdm

    config, files = resolve_transformer(name_or_path, revision, variant, cache_dir)
    family = families.from_transformer_config(config, name_or_path)
    with init_empty_weights():
        model = family.transformer_cls().from_config(config)
    quantized = set(_replace_linears_with_nf4(model, weight_dtype)) if nf4 else set()
    device = torch.device(device)
    for file in tqdm(files, desc="Loading transformer", disable=len(files) < 2):
        _load_file_into(model, file, quantized, device, weight_dtype)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise UserError(f"the transformer checkpoint in {files[0].parent} lacks {len(missing)} weights "
                        f"(e.g. {missing[0]}): is it a {family.label} transformer matching its config.json?")
    model.requires_grad_(False)
    model.eval()
    logger.info("Transformer loaded on %s: %d linear layers in NF4, %.1f MiB of weights",
                device, len(quantized), module_bytes(model) / 2**20)
    return model


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
    """The double-stream then single-stream blocks (FLUX.1-dev: 19 + 38, FLUX.2 [dev]: 8 + 48), in the order the
    forward runs them; both families name them alike."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

"""LoRA adapters on the Flux transformer: add them, save them as diffusers reads them, load them back."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flux_qlora.errors import UserError
from flux_qlora.files import written_atomically
from flux_qlora.models import base_precision_label, looks_like_hub_id

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EMA_WEIGHT_NAME = "pytorch_lora_weights_ema.safetensors"  # --use_ema: the averaged LoRA, beside the trained one
INIT_CHOICES = ("gaussian", "default", "pissa", "olora")
LORA_TARGET_PRESETS = {
    "attention": ["to_k", "to_q", "to_v", "to_out.0"],
    "attention+context": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"],
    "all-linear": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
                   "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                   "norm1.linear", "norm1_context.linear", "norm.linear"],
}


def target_modules(lora_layers: str) -> list[str]:
    """A preset name (attention, attention+context, all-linear) or a comma-separated list of module names."""
    if lora_layers in LORA_TARGET_PRESETS:
        return LORA_TARGET_PRESETS[lora_layers]
    return [name.strip() for name in lora_layers.split(",") if name.strip()]


def add_lora(transformer: nn.Module, rank: int, alpha: int | None, init: str, targets: list[str]) -> None:
    """Adds a trainable LoRA adapter ("default") and keeps its weights in fp32 (the base stays NF4/bf16)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True if init == "default" else init,
                        target_modules=targets)
    try:
        transformer.add_adapter(config)
    except ValueError as error:
        raise UserError(f"--lora_layers {','.join(targets)}: {error}") from None
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)


def check_rank(rank: int, config: dict) -> None:
    """A rank above the transformer's width can't be meant (it is a full-rank update with extra cost)."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if rank > width:
        raise UserError(f"--rank {rank} is above the transformer's width {width}: LoRA ranks are small (4-64).")


def save_lora(transformer: nn.Module, output_dir: str | Path, weight_name: str = LORA_WEIGHT_NAME,
              fold_alpha: bool = False) -> Path:
    """Writes `pytorch_lora_weights.safetensors` with `transformer.` keys and the LoRA config as metadata.

    `fold_alpha` (the LoRAs users load): the scale alpha / rank is multiplied into lora_B and the metadata says
    alpha = rank, so every loader applies the same strength: diffusers reads alpha from the metadata, ComfyUI only
    from `.alpha` tensors and otherwise uses scale 1. Checkpoints keep the trained values, to resume exactly."""
    from diffusers import FluxPipeline

    config = transformer.peft_config["default"].to_dict()
    state = lora_state_dict(transformer)
    if fold_alpha and config["lora_alpha"] != config["r"]:
        scale = config["lora_alpha"] / config["r"]
        state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
        config["lora_alpha"] = config["r"]
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"the LoRA holds non-finite values (NaN/inf, e.g. in {bad[0]}): not saved. Lower "
                        "--learning_rate or use bf16 instead of fp16.")
    with written_atomically(Path(output_dir) / weight_name) as partial:
        FluxPipeline.save_lora_weights(output_dir, transformer_lora_layers=state, weight_name=partial.name,
                                       transformer_lora_adapter_metadata=config)
    return Path(output_dir) / weight_name


def load_lora_into(transformer: nn.Module, lora_dir: str | Path) -> None:
    """Loads a saved LoRA's weights into the transformer's existing "default" adapter (resume)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(Path(lora_dir) / LORA_WEIGHT_NAME)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    expected = {m.r["default"] for m in transformer.modules() if hasattr(m, "lora_A") and "default" in m.r}
    if ranks != expected:
        raise UserError(f"{lora_dir} holds a LoRA of rank {sorted(ranks)}, this run builds rank {sorted(expected)}: "
                        "resume with the same --rank (or start a new --output_dir).")
    layers = {k.split(".lora_A.")[0] for k in state if ".lora_A." in k}
    built = {name for name, m in transformer.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if layers != built:
        differ = sorted(layers ^ built)[0]
        raise UserError(f"{lora_dir} holds a LoRA on {len(layers)} layers, this run builds {len(built)} (e.g. {differ} "
                        "is in only one): resume with the same --lora_layers (or start a new --output_dir).")
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{lora_dir}: the LoRA doesn't match this model ({len(unexpected)} unexpected keys, "
                        f"e.g. {unexpected[0]}); resume with the same --rank and --lora_layers.")


@contextmanager
def open_lora_file(path: str | Path):
    """A LoRA safetensors file opened lazily (safetensors' `safe_open`): a missing or damaged file is one clear
    line. The one way the package reads LoRA files."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path} is not a readable safetensors LoRA ({error}).") from None


def read_lora_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    with open_lora_file(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def lora_file_keys(path: str | Path) -> list[str]:
    """The tensor names only (nothing read but the header)."""
    with open_lora_file(path) as f:
        return list(f.keys())


def read_lora_metadata(path: str | Path) -> dict:
    """The LoRA config stored in a safetensors file by `save_lora` (empty if none)."""
    with open_lora_file(path) as f:
        metadata = f.metadata() or {}
    # diffusers stores {"transformer.r": 4, "transformer.lora_alpha": 4, ...} under "lora_adapter_metadata".
    raw = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    return {k.removeprefix("transformer."): v for k, v in raw.items() if k.startswith("transformer.")}


def resolve_lora_file(source: str, weight_name: str | None = None, cache_dir: str | None = None) -> Path:
    """The safetensors file of a LoRA given as a file, a folder or a Hub id (downloaded)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        file = path / (weight_name or LORA_WEIGHT_NAME)
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise UserError(f"--lora {source}: no {file.name} in that folder"
                            + (f"; pick one with --weight_name: {', '.join(found)}." if found else "."))
        return file
    if source.endswith(".safetensors") or not looks_like_hub_id(source):
        raise UserError(f"--lora {source}: no such file or folder, and not a Hub id (owner/name).")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, weight_name or LORA_WEIGHT_NAME, cache_dir=cache_dir))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise UserError(f"--lora {source}: could not get {weight_name or LORA_WEIGHT_NAME} from the Hub "
                        f"({error.__class__.__name__}); check the id, --weight_name and your connection.") from None


def lora_rank(file: Path) -> int:
    """The highest rank among the LoRA's layers (the shape of its down projections), read with the check that the
    file is a usable LoRA: LoRA weights, all finite (NaN/inf ones would make black images)."""
    state = read_lora_tensors(file)
    ranks = [t.shape[0] for k, t in state.items() if ("lora_A" in k or "lora_down" in k) and t.dim() == 2]
    if not ranks:
        raise UserError(f"{file} holds no LoRA weights (no lora_A / lora_down tensors).")
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"LoRA {file} holds NaN/inf values ({len(bad)} tensors, e.g. {bad[0]}): it is broken; use an "
                        "earlier checkpoint's LoRA.")
    return max(ranks)


FLUX_LAYER_NAMES = ("transformer_blocks", "double_blocks", "single_blocks", "x_embedder", "proj_out")


def trained_base_precision(file: Path) -> str | None:
    """NF4, bf16 or FP8: the base the LoRA trained on, from the training_config.toml beside it (None if absent)."""
    import tomllib

    config_file = Path(file).parent / "training_config.toml"
    if not config_file.is_file():
        return None
    try:
        config = tomllib.loads(config_file.read_text())
    except (tomllib.TOMLDecodeError, OSError):
        return None
    return base_precision_label(config.get("base_precision", "nf4"), bool(config.get("do_fp8_training")))


def check_lora_matches(file: Path, transformer: nn.Module) -> None:
    """Refuses a LoRA for another model family (no FLUX.1 layer names: e.g. an SDXL UNet's) and a diffusers-format
    LoRA made for another model (layers missing or of other sizes); other FLUX.1 layouts (kohya, BFL) are converted
    and checked by diffusers itself."""
    state = read_lora_tensors(file)
    if not any(name in key for key in state for name in FLUX_LAYER_NAMES):
        raise UserError(f"LoRA {file} has no FLUX.1 layers (e.g. {next(iter(state))}): it is for another model "
                        "family (SD 1.5/SDXL UNet?); give a LoRA trained for FLUX.1.")
    modules = dict(transformer.named_modules())
    for key, a in state.items():
        if not key.startswith("transformer.") or not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        b = state.get(f"transformer.{name}.lora_B.weight")
        check_layer_fits(file, name, modules.get(name) or modules.get(f"{name}.base_layer"), a.shape[1],
                         None if b is None else b.shape[0])


def check_layer_fits(file: Path, name: str, layer: nn.Module | None, in_features: int,
                     out_features: int | None) -> nn.Linear:
    """The one "this LoRA doesn't fit this transformer" rule: `name` is a linear layer of these sizes."""
    sizes = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
    if sizes[0] is None or sizes[0] != in_features or out_features not in (None, sizes[1]):
        found = "no such linear layer" if sizes[0] is None else f"{sizes[0]} -> {sizes[1]}"
        raise UserError(f"LoRA {file} doesn't fit this transformer: layer {name} is {in_features} -> "
                        f"{out_features or '?'} in the LoRA, {found} in the model. Is it a LoRA for another model?")
    return layer

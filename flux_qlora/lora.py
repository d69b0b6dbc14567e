"""LoRA adapters on the FLUX.1 or FLUX.2 transformer: add them, save them as diffusers reads them, load them back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flux_qlora.errors import UserError
from flux_qlora.families import Family
from flux_qlora.families.flux1 import FLUX1
from flux_qlora.files import looks_like_hub_id, written_atomically
from flux_qlora.readers import check_finite, open_safetensors
from flux_qlora.readers import read_safetensors as read_tensors

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EMA_WEIGHT_NAME = "pytorch_lora_weights_ema.safetensors"  # --use_ema: the averaged LoRA, beside the trained one
INIT_CHOICES = ("gaussian", "default", "pissa", "olora")
PRESET_NAMES = ("attention", "attention+context", "all-linear")  # each family's module names: Family.lora_presets


def is_target(name: str, targets: list[str] | tuple[str, ...]) -> bool:
    """Whether module `name` is one of `targets`, as peft matches target_modules: the whole name or its suffix."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def target_modules(lora_layers: str, family: Family = FLUX1, config: dict | None = None) -> list[str]:
    """A preset name (attention, attention+context, all-linear: module names of `family`'s transformer) or a
    comma-separated list of module names. A preset's `{single}` names one module per single block of a transformer
    of `config` (FLUX.2's `attn.to_out` is a linear layer there and a ModuleList in the double blocks)."""
    if lora_layers not in family.lora_presets:
        return [name.strip() for name in lora_layers.split(",") if name.strip()]
    names = []
    for name in family.lora_presets[lora_layers]:
        if "{single}" in name:
            names += [name.format(single=f"single_transformer_blocks.{i}")
                      for i in range((config or {}).get("num_single_layers", 0))]
        else:
            names.append(name)
    return names


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

    name = Path(lora_dir).name
    state, _ = read_safetensors(Path(lora_dir) / LORA_WEIGHT_NAME, f"{name} is damaged: its LoRA",
                                f"resume from an earlier checkpoint, or delete {name}", finite=True)
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


LORA_FIX = "give a LoRA .safetensors file (pytorch_lora_weights.safetensors of a run, or a ComfyUI/kohya LoRA)"


def open_lora_file(path: str | Path):
    """A LoRA safetensors file opened lazily: missing, empty or damaged is one clear line (`readers`)."""
    return open_safetensors(path, "LoRA", LORA_FIX)


def read_safetensors(path: str | Path, what: str = "LoRA", fix: str = LORA_FIX,
                     finite: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All the file's tensors and its header's metadata, in one open."""
    return read_tensors(path, what, fix, finite=finite)


def read_lora_metadata(path: str | Path) -> dict:
    """The LoRA config stored in a safetensors file by `save_lora` (empty if none); nothing read but the header."""
    with open_lora_file(path) as f:
        return lora_config(f.metadata() or {})


def adapter_metadata(metadata: dict[str, str]) -> dict | None:
    """The LoRA config as diffusers reads it from a file's metadata ({"transformer.r": 4, ...}), None if absent."""
    raw = metadata.get("lora_adapter_metadata")
    return json.loads(raw) if raw else None


def lora_config(metadata: dict[str, str]) -> dict:
    """The transformer's LoRA config (r, lora_alpha, ...) in a file's metadata, without the `transformer.` prefix."""
    raw = adapter_metadata(metadata) or {}
    return {k.removeprefix("transformer."): v for k, v in raw.items() if k.startswith("transformer.")}


Layer = tuple[torch.Tensor, torch.Tensor]  # (lora_A, lora_B): the weight delta is scale * B @ A


def layers(state: dict[str, torch.Tensor], source: str | Path = "the LoRA") -> dict[str, Layer]:
    """Layer name -> (lora_A, lora_B) of a diffusers-layout LoRA's transformer layers
    (`transformer.NAME.lora_A.weight`): the one loop over them."""
    found = {}
    for key, a in state.items():
        if not key.startswith("transformer.") or not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        b = state.get(f"transformer.{name}.lora_B.weight")
        if b is None:
            raise UserError(f"{source}: layer {name} has a lora_A weight without its lora_B: the file is incomplete.")
        found[name] = (a, b)
    return found


@dataclass
class LoraFile:
    """A LoRA file read once (`convert.read_lora_file`): what the checks and the LoRA servers use, so that none
    reads the file again."""

    path: Path  # the file given (for a kohya file, the converted tensors' source)
    tensors: dict[str, torch.Tensor]  # in the diffusers layout: a kohya/ComfyUI file is converted on read
    metadata: dict[str, str]  # the safetensors header's (none for a converted kohya file: its config is folded in)
    trained_base: str | None  # NF4, bf16 or FP8: from the training_config.toml beside the file, if any
    trained_family: str | None = None  # the model family it trained on: from the same file

    @property
    def rank(self) -> int:
        """The highest rank among the LoRA's layers (the shape of its down projections)."""
        ranks = [t.shape[0] for k, t in self.tensors.items() if ("lora_A" in k or "lora_down" in k) and t.dim() == 2]
        if not ranks:
            raise UserError(f"{self.path} holds no LoRA weights (no lora_A / lora_down tensors).")
        return max(ranks)

    def check_finite(self) -> None:
        """NaN/inf weights would make black images."""
        check_finite(self.tensors, self.path, "LoRA", "it is broken; use an earlier checkpoint's LoRA")

    def layers(self) -> dict[str, Layer]:
        return layers(self.tensors, f"LoRA {self.path}")

    @property
    def adapter_metadata(self) -> dict | None:
        return adapter_metadata(self.metadata)


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


FLUX_LAYER_NAMES = ("transformer_blocks", "double_blocks", "single_blocks", "x_embedder", "proj_out")


def check_lora_matches(lora: LoraFile, transformer: nn.Module) -> None:
    """Refuses a LoRA for another model family (no FLUX.1 layer names: e.g. an SDXL UNet's) and a diffusers-format
    LoRA made for another model (layers missing or of other sizes); other FLUX.1 layouts (kohya, BFL) are converted
    and checked by diffusers itself."""
    state, file = lora.tensors, lora.path
    if not any(name in key for key in state for name in FLUX_LAYER_NAMES):
        raise UserError(f"LoRA {file} has no FLUX.1 or FLUX.2 layers (e.g. {next(iter(state))}): it is for another "
                        "model family (SD 1.5/SDXL UNet?); give a LoRA trained for this model.")
    modules = dict(transformer.named_modules())
    for name, (a, b) in lora.layers().items():
        check_layer_fits(file, name, modules.get(name) or modules.get(f"{name}.base_layer"), a.shape[1], b.shape[0])


def check_layer_fits(file: Path, name: str, layer: nn.Module | None, in_features: int, out_features: int) -> nn.Linear:
    """The one "this LoRA doesn't fit this transformer" rule: `name` is a linear layer of these sizes."""
    sizes = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
    if sizes[0] is None or sizes != (in_features, out_features):
        found = "no such linear layer" if sizes[0] is None else f"{sizes[0]} -> {sizes[1]}"
        raise UserError(f"LoRA {file} doesn't fit this transformer: layer {name} is {in_features} -> "
                        f"{out_features} in the LoRA, {found} in the model. Is it a LoRA for another model?")
    return layer

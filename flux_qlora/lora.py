"""LoRA adapters on the Flux transformer: add them, save them as diffusers reads them, load them back."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flux_qlora.data import UserError
from flux_qlora.models import LORA_TARGET_PRESETS, looks_like_hub_id

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
INIT_CHOICES = ("gaussian", "default", "pissa", "olora")


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


def save_lora(transformer: nn.Module, output_dir: str | Path) -> Path:
    """Writes `pytorch_lora_weights.safetensors` with `transformer.` keys and the LoRA config as metadata."""
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(
        output_dir, transformer_lora_layers=lora_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return Path(output_dir) / LORA_WEIGHT_NAME


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
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{lora_dir}: the LoRA doesn't match this model ({len(unexpected)} unexpected keys, "
                        f"e.g. {unexpected[0]}); resume with the same --rank and --lora_layers.")


def read_lora_metadata(path: str | Path) -> dict:
    """The LoRA config stored in a safetensors file by `save_lora` (empty if none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
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


def _lora_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise UserError(f"{file} is not a readable safetensors LoRA ({error}).") from None


def lora_rank(file: Path) -> int:
    """The highest rank among the LoRA's layers (the shape of its down projections)."""
    ranks = [t.shape[0] for k, t in _lora_tensors(file).items() if ("lora_A" in k or "lora_down" in k) and t.dim() == 2]
    if not ranks:
        raise UserError(f"{file} holds no LoRA weights (no lora_A / lora_down tensors).")
    return max(ranks)


def check_lora_matches(file: Path, transformer: nn.Module) -> None:
    """Refuses a diffusers-format LoRA made for another model (layers missing or of other sizes)."""
    state = _lora_tensors(file)
    modules = dict(transformer.named_modules())
    for key, tensor in state.items():
        if not key.startswith("transformer.") or ".lora_A." not in key:
            continue  # other formats (kohya, BFL) are converted and checked by diffusers itself
        name = key.removeprefix("transformer.").split(".lora_A.")[0]
        module = modules.get(name) or modules.get(f"{name}.base_layer")
        in_features = getattr(module, "in_features", None)
        if module is None or in_features != tensor.shape[1]:
            found = "missing" if module is None else f"{in_features} inputs"
            raise UserError(f"LoRA {file} doesn't fit this transformer: layer {name} has {tensor.shape[1]} inputs "
                            f"in the LoRA, {found} in the model. Is it a LoRA for another model?")


class FlatLora:
    """All LoRA weights in one flat fp32 buffer, `master`: the optimizer's only parameter, so the optimizer step and
    gradient clipping run a handful of kernels instead of kernels for each of the ~760 small LoRA tensors of Flux.

    With `compute_dtype` bf16/fp16 (mixed precision, one process) the model's LoRA weights are views of a flat copy
    in that dtype, refreshed after each optimizer step by one copy: the compiled blocks then take them as they are
    instead of casting each weight in every graph (~1,100 tiny cast kernels per Flux step). The values the model
    computes with are the same as autocast's casts; gradients are added into `master.grad` in fp32 every micro
    step. Otherwise (fp32, or DDP, which reduces the weights' own gradients) the weights are views of `master`.
    """

    def __init__(self, params: list[nn.Parameter], compute_dtype: torch.dtype = torch.float32):
        self.params = params
        self.master = nn.Parameter(torch.cat([p.detach().float().reshape(-1) for p in params]))
        self.compute = self.master.detach().to(compute_dtype) if compute_dtype != torch.float32 else None
        if self.compute is not None:  # allocated once and zeroed in place: a CUDA graph adds into this address
            self.master.grad = torch.zeros_like(self.master)
        self._view_params(self.compute if self.compute is not None else self.master.data)

    @property
    def gathers_each_micro_step(self) -> bool:
        """With a compute copy, each micro step's gradients go into master.grad at once (and can be captured)."""
        return self.compute is not None

    def _view_params(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            p.data = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def gather_grads(self) -> None:
        """master.grad (+)= the LoRA weights' gradients in fp32; the weights' own are cleared when they are copies."""
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        if self.compute is None:
            self.master.grad = grads
            return
        self.master.grad.add_(grads)
        for p in self.params:
            p.grad = None

    def zero_grad(self) -> None:
        if self.compute is not None:
            self.master.grad.zero_()
            return
        self.master.grad = None
        for p in self.params:
            p.grad = None

    def sync(self) -> None:
        """After an optimizer step (or loading): the compute copy takes the master weights."""
        if self.compute is not None:
            self.compute.copy_(self.master.detach())

    @contextmanager
    def master_weights(self):
        """The model's LoRA weights as views of the fp32 master while inside: to save or load them exactly."""
        if self.compute is None:
            yield
            return
        self._view_params(self.master.data)
        try:
            yield
        finally:
            self._view_params(self.compute)
            self.sync()

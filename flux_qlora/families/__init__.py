"""Model families: what differs between FLUX.1 and FLUX.2 lives in one module per family, behind `Family`.

The scripts, the data side, NF4 loading, the compiled step, checkpoints, buckets, masks, EMA, the eval loss and
serving ask the family for what they need (classes, text encoding, latent normalization, position ids, the
transformer's inputs, LoRA presets, the tiny test model) and never branch on which one it is.

A family is read from the model: a pipeline folder's `model_index.json` names its pipeline class, a transformer
folder's `config.json` its transformer class (FLUX.2 [dev] and [klein] share one class; [dev] alone has guidance
embeddings). It is recorded in the embeddings manifest, the checkpoint and `training_config.toml`, and files of
one family are refused on another with one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flux_qlora.errors import UserError


@dataclass(frozen=True)
class ActivationModel:
    """The memory plan's activation constants of a family's blocks (memory.py), fitted to measured peaks: bytes per
    token and hidden unit that a checkpointed block keeps (its bf16 input, rotary, modulation) and that one block
    keeps for its backward, and the workspaces beside them."""

    ckpt_input_bytes: float
    block_bytes: float
    workspace_gib: float


@dataclass(frozen=True)
class LoraLayout:
    """How a family's LoRA layers are named where ComfyUI, Forge and kohya read them: the original (BFL) module
    names, where a block's q, k and v (FLUX.1's single blocks: also the MLP input) are one fused linear."""

    prefix: str  # before every layer name
    separator: str  # between the parts of a layer name ("_" in kohya's layout)
    down: str  # the suffixes of the two factors
    up: str
    alpha: bool  # an `.alpha` tensor per layer (scale alpha / rank); without, the scale is folded into `up`
    double: dict[str, tuple[str, int | None]]  # diffusers name in a double block -> (BFL name, part of a fused one)
    single: dict[str, tuple[str, int | None]]  # the same in a single block
    top: dict[str, str]  # the linears outside the blocks
    part_widths: dict[str, tuple[int, ...]]  # a fused layer's parts, in model widths
    base_model: str  # what the file's metadata names (ss_base_model_version)

    def key(self, name: str) -> str:
        """'double_blocks.0.img_attn.qkv' -> this layout's layer key."""
        return self.prefix + name.replace(".", self.separator)


class Family:
    """The interface every family implements (flux1.py, flux2.py); the defaults are what the families share."""

    name: str  # recorded in files: "flux1", "flux2-klein", "flux2-dev"
    label: str  # for people: "FLUX.1", "FLUX.2 [klein]", "FLUX.2 [dev]"
    pipeline_classes: tuple[str, ...]  # model_index.json's _class_name values of this family
    transformer_class: str
    vae_class: str
    lora_presets: dict[str, list[str]]  # --lora_layers presets: module names of this family's transformer
    lora_layout: LoraLayout  # its LoRAs' names in ComfyUI / kohya files
    lora_markers: tuple[str, ...]  # module-name parts only this family's LoRAs have (diffusers layout)
    default_guidance: float = 3.5  # sample images' guidance scale
    default_steps: int = 28  # sample images' step count
    # Training may use PyTorch's cuDNN attention (the family's blocks hand its backward contiguous gradients:
    # `give_attention_contiguous_gradients`); it is the Hopper default once measured faster and correct on a GPU.
    prefer_cudnn_attention: bool = True
    activations: ActivationModel  # the memory plan's constants, measured per family
    samples_with_negative: bool = False  # its pipeline guides with a negative (empty) prompt: klein base
    guidance_embeds: bool = True  # the transformer takes a guidance vector (guidance-distilled models)

    # --- classes --------------------------------------------------------------------------------------------
    def transformer_cls(self) -> type[nn.Module]:
        raise NotImplementedError

    def pipeline_cls(self):
        raise NotImplementedError

    # The layers NF4 takes: the repeated blocks hold the bulk (>99% on FLUX.1) of the weights; the small embedders
    # and the output layer stay in the weight dtype, as in the NF4 checkpoints the diffusers team publishes.
    quantized_prefixes: tuple[str, ...] = ("transformer_blocks.", "single_transformer_blocks.")

    # --- text -----------------------------------------------------------------------------------------------
    text_encoders: tuple[str, ...]  # the pipeline's text encoder components
    big_text_encoder: str  # the one worth quantizing (T5-XXL, Qwen3, Mistral Small 3.1)

    def text_encoder_class(self):
        raise NotImplementedError

    def load_big_text_encoder(self, name_or_path: str, quantize: str, dtype: torch.dtype, hub: dict) -> nn.Module:
        """The big text encoder in 8 bits or NF4 (bitsandbytes, on the GPU): T5-XXL ~4.9 / ~3 GB instead of ~9.5,
        Mistral Small 3.1 ~25 / ~14 GB instead of ~48."""
        from transformers import BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_8bit=True) if quantize == "8bit" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                     bnb_4bit_use_double_quant=True))
        return self.text_encoder_class().from_pretrained(name_or_path, subfolder=self.big_text_encoder, dtype=dtype,
                                                         quantization_config=config, **hub)

    def load_text_pipeline(self, name_or_path: str, device: str, quantize: str | None, dtype: torch.dtype,
                           hub: dict):
        """A pipeline holding only the tokenizer(s) and text encoder(s), on `device`; `quantize` ("8bit"/"nf4",
        GPU only) for the big encoder."""
        extra = {self.big_text_encoder: self.load_big_text_encoder(name_or_path, quantize, dtype, hub)} if quantize \
            else {}
        pipe = self.pipeline_cls().from_pretrained(name_or_path, transformer=None, vae=None, dtype=dtype, **hub,
                                                   **extra)
        for name in self.text_encoders:
            module = getattr(pipe, name)
            if not getattr(module, "is_quantized", False):
                module.to(device)
        return pipe

    def serving_defaults(self, pipeline_config: Mapping) -> tuple[int, float]:
        """(steps, guidance scale) of a model of this family, as its model card gives them; `pipeline_config`: its
        model_index.json (a pipeline's `.config`)."""
        return self.default_steps, self.default_guidance

    def encode_prompts(self, pipe, prompts: list[str], max_sequence_length: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt_embeds (N, seq, dim), pooled (N, pooled_dim; width 0 where the family has none), text_ids
        (seq, id_axes)) as the family's pipeline computes them."""
        raise NotImplementedError

    # compute_embeddings.py's default text length: the caption's tokens and the template's (FLUX.1: CLIP's 77)
    default_max_sequence_length: int = 77

    # --- latents and positions ------------------------------------------------------------------------------
    def load_vae(self, name_or_path: str, device, dtype: torch.dtype, hub: dict):
        raise NotImplementedError

    def normalize_latents(self, vae, mean: torch.Tensor) -> torch.Tensor:
        """The VAE's latent mean -> what the transformer is trained on, (B, C, H/8, W/8)."""
        raise NotImplementedError

    def image_ids(self, height: int, width: int, device=None, dtype=None) -> torch.Tensor:
        """Positions of the packed 2x2-patch tokens of latents of (height, width)."""
        raise NotImplementedError

    def text_ids(self, length: int) -> torch.Tensor:
        """Positions of `length` text tokens, as the family's pipeline makes them."""
        raise NotImplementedError

    def resolution_shift(self, image_seq_len: int) -> float:
        """exp(mu) of the family's resolution-dependent timestep shift (training's `--timestep_shift auto`)."""
        raise NotImplementedError

    # --- the transformer's forward --------------------------------------------------------------------------
    def give_attention_contiguous_gradients(self, transformer: nn.Module) -> None:
        """Works around PyTorch's cuDNN attention backward (torch 2.11, aten/src/ATen/native/cudnn/MHA.cpp): it
        caches the cuDNN graph it builds under a key of q/k/v's shapes and strides, but builds it with the first
        call's grad_output strides. An attention output concatenated with the MLP's (the single blocks) gets its
        gradient as a slice of a wider one, a double block's arrives contiguous; with the same q/k/v, one graph then
        reads the other's gradient with the wrong strides (the illegal memory access and wrong LoRA gradients in
        BENCHMARKS.md; `bench/attention_backward.py --cache` checks it on a GPU). Copied contiguous
        (`blocks.contiguous_gradient`), every attention's gradient has one stride layout, so one graph serves all
        (the price: one copy of a (tokens x width) tensor per single block)."""
        raise NotImplementedError

    def forward(self, transformer: nn.Module, tokens: torch.Tensor, timestep: torch.Tensor, guidance,
                prompt_embeds: torch.Tensor, pooled: torch.Tensor, text_ids: torch.Tensor,
                image_ids: torch.Tensor) -> torch.Tensor:
        """The velocity the transformer predicts for packed `tokens` at `timestep` (sigma in [0, 1])."""
        raise NotImplementedError

    def sample_pipeline(self, transformer: nn.Module, vae, scheduler, distilled: bool = False):
        """A pipeline around the training transformer and the VAE, no text encoders (prompt embeddings given);
        `distilled`: a step-distilled model (no classifier-free guidance)."""
        raise NotImplementedError

    def sample_kwargs(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                      negative: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The pipeline call's text inputs; `negative`: the empty prompt's embeddings, for families that sample
        with classifier-free guidance (`samples_with_negative`)."""
        raise NotImplementedError

    def load_scheduler(self, name_or_path: str, hub: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(name_or_path, subfolder="scheduler", **hub)

    # --- tests and the demo ---------------------------------------------------------------------------------
    def build_tiny_pipeline(self, output_dir: Path, seed: int = 0) -> Path:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def all_families() -> list[Family]:
    from flux_qlora.families import flux1, flux2

    return [flux1.FLUX1, flux2.KLEIN, flux2.DEV]


FAMILY_NAMES = ("flux1", "flux2-klein", "flux2-dev")


def by_name(name: str) -> Family:
    for family in all_families():
        if family.name == name:
            return family
    raise UserError(f"unknown model family {name!r}; the families are {', '.join(FAMILY_NAMES)}.")


def from_pipeline_class(class_name: str, where: str) -> Family:
    for family in all_families():
        if class_name in family.pipeline_classes:
            return family
    raise UserError(f"{where} holds a {class_name}: flux-qlora trains FLUX.1 (FluxPipeline) and FLUX.2 "
                    "(Flux2Pipeline, Flux2KleinPipeline) models.")


def from_transformer_config(config: dict, where: str) -> Family:
    """A transformer folder alone: its class, and for FLUX.2 the guidance embeddings that only [dev] has."""
    name = config.get("_class_name", "FluxTransformer2DModel")
    matches = [f for f in all_families() if f.transformer_class == name]
    if not matches:
        raise UserError(f"{where} holds a {name}, not a FLUX.1 or FLUX.2 transformer.")
    if len(matches) > 1:
        guided = bool(config.get("guidance_embeds", False))
        matches = [f for f in matches if f.guidance_embeds == guided] or matches
    return matches[0]


def for_vae(vae: nn.Module) -> Family:
    """The family whose VAE this is (latents are normalized per family; both FLUX.2 variants share theirs)."""
    for family in all_families():
        if type(vae).__name__ == family.vae_class:
            return family
    raise UserError(f"a {type(vae).__name__} is not the VAE of a FLUX.1 or FLUX.2 pipeline.")


def for_lora(layer_names: list[str], recorded: str | None = None) -> Family:
    """The family a diffusers-layout LoRA is for: the one its run recorded, else the one whose own module names it
    uses (FLUX.1 where it names only modules both have: the double blocks' attention is named alike)."""
    if recorded:
        return by_name(recorded)
    found = [f for f in all_families() if any(m in name for name in layer_names for m in f.lora_markers)]
    return found[0] if len(found) == 1 else all_families()[0]


def read_model_index(name_or_path: str, revision=None, cache_dir=None) -> dict | None:
    """A pipeline's model_index.json (local folder or Hub id), None for a transformer-only folder or repo."""
    from flux_qlora.files import looks_like_hub_id
    from flux_qlora.readers import read_json

    path = Path(name_or_path)
    if path.is_dir():
        index = path / "model_index.json"
        return read_json(index, "model index", REDOWNLOAD) if index.exists() else None
    if not looks_like_hub_id(name_or_path):
        raise UserError(f"--pretrained_model_name_or_path {name_or_path}: no such folder, and not a Hub id "
                        "(owner/name) either.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        index = hf_hub_download(name_or_path, "model_index.json", revision=revision, cache_dir=cache_dir)
    except EntryNotFoundError:
        return None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise UserError(f"{name_or_path}: could not read its model_index.json from the Hub "
                        f"({error.__class__.__name__}); check the id, --revision and your connection.") from None
    return read_json(index, "model index", REDOWNLOAD)


REDOWNLOAD = "download the model again (or point at a complete Flux pipeline folder)"


def detect_pipeline(name_or_path: str, transformer_config: dict | None = None, revision=None, cache_dir=None,
                    flag: str = "--pretrained_model_name_or_path") -> Family:
    """`detect` for what the scripts load as a pipeline (text encoders, VAE, scheduler): a folder or repo without
    its model_index.json is refused in one line, not at the first `from_pretrained`."""
    index = read_model_index(name_or_path, revision, cache_dir)
    if index is None:
        raise UserError(f"{flag} {name_or_path} has no model_index.json: give a whole Flux pipeline (a folder with "
                        "model_index.json, transformer/, vae/ and the text encoders, or its Hub id).")
    return _from_index(index, name_or_path, transformer_config)


def detect(name_or_path: str, transformer_config: dict | None = None, revision=None, cache_dir=None) -> Family:
    """The family of a model: from its pipeline's class, else (a transformer folder) from the transformer's config;
    a `transformer_config` given with a pipeline (--pretrained_transformer_model_name_or_path) must be of its family."""
    index = read_model_index(name_or_path, revision, cache_dir)
    if index is not None:
        return _from_index(index, name_or_path, transformer_config)
    if transformer_config is None:
        from flux_qlora.models import read_transformer_config

        transformer_config = read_transformer_config(name_or_path, revision, cache_dir)
    return from_transformer_config(transformer_config, name_or_path)


def _from_index(index: dict, name_or_path: str, transformer_config: dict | None) -> Family:
    family = from_pipeline_class(str(index.get("_class_name", "?")), name_or_path)
    if transformer_config is not None:
        other = from_transformer_config(transformer_config, "the transformer")
        if other is not family:
            raise UserError(f"the transformer is a {other.label} one and {name_or_path} a {family.label} "
                            "pipeline: give a transformer of the pipeline's family.")
    return family


def check_same_family(found: str | None, family: Family, what: str, fix: str) -> None:
    """Refuses a file made for another family (`found`: the family it records; None: made before families were
    recorded, so FLUX.1)."""
    found = found or "flux1"
    if found != family.name:
        raise UserError(f"{what} was made for {by_name(found).label}, this model is {family.label}: {fix}.")

"""LoRA files in the other layouts users load, both ways: the ComfyUI/kohya layout of each model family (what
ComfyUI, Forge and kohya's sd-scripts read and write) and diffusers' `transformer.*` (what we train and the
diffusers pipelines' `load_lora_weights` read):

    python -m flux_qlora.convert my-lora/pytorch_lora_weights.safetensors my-lora-comfyui.safetensors --to comfyui
    python -m flux_qlora.convert someone-elses-kohya-lora.safetensors diffusers-lora.safetensors --to diffusers

FLUX.1's layout is kohya's `lora_unet_*` with an `.alpha` per layer; FLUX.2's is ComfyUI's `diffusion_model.*` with
lora_A/lora_B and the scale folded in (which diffusers' FLUX.2 loader reads back too). Both use the original (BFL)
layer names, where a double block's q, k and v projections are one fused `img_attn.qkv` (and `txt_attn.qkv`)
linear (FLUX.1's single blocks: q, k, v and the MLP input are one `linear1`): their LoRAs become one LoRA of the
fused layer whose down projection stacks theirs and whose up projection is block diagonal (the missing parts
zero). Back, each part takes the up projection's rows of its slice and the rank columns that are non-zero there,
the scale alpha / rank folded into them: exact both ways. The names of each family are its `LoraLayout`
(flux_qlora/families/).
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch

from flux_qlora import families
from flux_qlora.errors import UserError
from flux_qlora.families import Family, LoraLayout
from flux_qlora.families.flux1 import FLUX1
from flux_qlora.files import written_atomically
from flux_qlora.lora import LoraFile, layers, lora_config, read_safetensors
from flux_qlora.run_config import config_beside, trained_base_precision, trained_family

logger = logging.getLogger(__name__)

KOHYA_PREFIX = FLUX1.lora_layout.prefix  # "lora_unet_"
COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"  # the trainer's --export_format copy
BLOCK_NAMES = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def bfl_name(name: str, layout: LoraLayout) -> tuple[str, int | None]:
    """A diffusers layer name -> (its BFL layer, the part of that fused layer it is, None: not fused)."""
    if name in layout.top:
        return layout.top[name], None
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
    table = {"transformer_blocks": layout.double, "single_transformer_blocks": layout.single}.get(
        match.group(1) if match else "", {})
    if match is None or match.group(3) not in table:
        known = ", ".join([*layout.double, *layout.single][:6])
        raise UserError(f"layer {name} has no name in the {layout.base_model} ComfyUI/kohya layout: the blocks' "
                        f"linear layers ({known}, ...) and {', '.join(layout.top)} convert.")
    target, part = table[match.group(3)]
    return f"{BLOCK_NAMES[match.group(1)]}.{match.group(2)}.{target}", part


def to_kohya(state: dict[str, torch.Tensor], alpha: float | None = None,
             layout: LoraLayout = FLUX1.lora_layout) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA (`transformer.*` keys; scale alpha / rank, alpha = rank when None: our saved files)
    in the family's ComfyUI/kohya `layout`, fused layers joined, every layer's scale kept (an `.alpha` per layer,
    or folded into the up weights)."""
    groups: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, (a, b) in layers(state).items():
        target, part = bfl_name(name, layout)
        scale = (alpha if alpha is not None else a.shape[0]) / a.shape[0]
        groups.setdefault(target, {})[part] = (a, b * scale)
    converted = {}
    for target, found in groups.items():
        a, b = found[None] if None in found else _join_parts(found, layout.part_widths[target.split(".", 2)[2]])
        key = layout.key(target)
        converted[f"{key}.{layout.down}"] = a.contiguous()
        converted[f"{key}.{layout.up}"] = b.contiguous()
        if layout.alpha:
            converted[f"{key}.alpha"] = torch.tensor(float(a.shape[0]))  # scale 1: the scales are in the up weights
    return converted


def _join_parts(found: dict, widths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked downs and a block-diagonal up over the fused layer's rows; parts without a LoRA stay zero."""
    part, (_, b) = next(iter(found.items()))
    width = b.shape[0] // widths[part]  # the model width, from any part's rows
    rows = [width * units for units in widths]
    present = sorted(found)
    down = torch.cat([found[p][0] for p in present])
    up = torch.zeros(sum(rows), down.shape[0], dtype=down.dtype)
    column = 0
    for p in present:
        a, b = found[p]
        up[sum(rows[:p]) : sum(rows[: p + 1]), column : column + a.shape[0]] = b
        column += a.shape[0]
    return down, up


def to_diffusers(converted: dict[str, torch.Tensor], layout: LoraLayout = FLUX1.lora_layout) -> dict[str, torch.Tensor]:
    """A LoRA in the family's ComfyUI/kohya `layout` in the diffusers layout (`transformer.*`), each layer's
    alpha / rank folded into its up weights (so it loads at scale 1 with alpha = rank). A fused layer splits by its
    rows (its parts' widths), each part taking the rank columns that are non-zero in its rows."""
    names = {}  # layout key -> [(diffusers name, part)]
    for block, bfl_block in BLOCK_NAMES.items():
        table = layout.double if block == "transformer_blocks" else layout.single
        for name, (target, part) in table.items():
            names.setdefault((bfl_block, layout.key(target).removeprefix(layout.prefix)), []).append((name, part))
    tops = {layout.key(target): name for name, target in layout.top.items()}
    state = {}
    for key, down in converted.items():
        if not key.endswith(f".{layout.down}"):
            continue
        stem = key.removesuffix(f".{layout.down}")
        if f"{stem}.{layout.up}" not in converted:
            raise UserError(f"{stem} has a {layout.down} without its {layout.up}: the file is incomplete.")
        up = converted[f"{stem}.{layout.up}"]
        scale = float(converted.get(f"{stem}.alpha", torch.tensor(float(down.shape[0])))) / down.shape[0]
        if stem in tops:
            state[f"transformer.{tops[stem]}.lora_A.weight"] = down.contiguous()
            state[f"transformer.{tops[stem]}.lora_B.weight"] = (up * scale).contiguous()
            continue
        sep = re.escape(layout.separator)
        match = re.fullmatch(rf"{re.escape(layout.prefix)}(double_blocks|single_blocks){sep}(\d+){sep}(.+)", stem)
        if match is None or (match.group(1), match.group(3)) not in names:
            raise UserError(f"{stem} is not a {layout.base_model} transformer layer in the ComfyUI/kohya layout "
                            f"({layout.prefix}double_blocks{layout.separator}N... / "
                            f"{layout.prefix}single_blocks{layout.separator}N...).")
        block = {v: k for k, v in BLOCK_NAMES.items()}[match.group(1)]
        for name, part in names[(match.group(1), match.group(3))]:
            widths = next((w for t, w in layout.part_widths.items()
                           if layout.key(t).removeprefix(layout.prefix) == match.group(3)), (1,))
            b = up[_part_rows(part, widths, up.shape[0])] * scale
            columns = torch.arange(down.shape[0]) if part is None else b.abs().sum(0).nonzero().flatten()
            if len(columns) == 0:
                continue  # no LoRA on this part of the fused layer
            prefix = f"transformer.{block}.{match.group(2)}.{name}"
            state[f"{prefix}.lora_A.weight"] = down[columns].contiguous()
            state[f"{prefix}.lora_B.weight"] = b[:, columns].contiguous()
    return state


def _part_rows(part: int | None, widths: tuple[int, ...], rows: int) -> slice:
    """The rows of `part` of a fused layer of `rows` rows whose parts are `widths` model widths wide (all of them
    for an unfused layer)."""
    if part is None:
        return slice(None)
    width = rows // sum(widths)
    return slice(width * sum(widths[:part]), width * sum(widths[: part + 1]))


def read_lora_file(path: Path, family: Family | None = None) -> LoraFile:
    """A LoRA file read once, in the diffusers layout: a ComfyUI/kohya one (other trainers', ComfyUI's) converted
    on read (`comfyui_as_diffusers`, in the layout of `family`: the model's, where known), so every way infer.py
    serves LoRAs (load, fuse, both hotswaps) reads one layout."""
    tensors, metadata = read_safetensors(path)
    config = config_beside(path)
    recorded = trained_family(config)
    converted = comfyui_as_diffusers(tensors, path, family or (families.by_name(recorded) if recorded else None))
    if converted is not None:
        tensors, metadata = converted, {}  # what diffusers saw in the converted copy it was once given
    return LoraFile(path, tensors, metadata, trained_base_precision(config), recorded)


# The two namings ComfyUI reads any family's layers in: kohya's, and ComfyUI's own state-dict keys.
NAMINGS = (dict(prefix="lora_unet_", separator="_", down="lora_down.weight", up="lora_up.weight"),
           dict(prefix="diffusion_model.", separator=".", down="lora_A.weight", up="lora_B.weight"))


def comfyui_layout_of(state: dict[str, torch.Tensor], family: Family) -> LoraLayout | None:
    """The ComfyUI/kohya naming of `family`'s layers that `state` uses, None for a diffusers-layout file."""
    for naming in NAMINGS:
        if any(k.startswith(naming["prefix"]) for k in state):
            return replace(family.lora_layout, **naming)
    return None


def comfyui_as_diffusers(state: dict[str, torch.Tensor], file: Path,
                         family: Family | None = None) -> dict[str, torch.Tensor] | None:
    """A ComfyUI/kohya-layout LoRA's transformer layers in the diffusers layout, read as layers of `family`
    (default FLUX.1), at any model width (diffusers' own kohya conversion assumes FLUX.1's 3072); None for the
    diffusers layout, and for files with layers this converter doesn't map (their text-encoder parts aside), which
    are left to diffusers' loaders."""
    layout = comfyui_layout_of(state, family or FLUX1)
    if layout is None:
        return None
    transformer_part = {k: v.float() for k, v in state.items() if k.startswith(layout.prefix)}
    try:
        converted = to_diffusers(transformer_part, layout)
    except UserError:
        return None
    if len(transformer_part) < len(state):
        logger.warning("LoRA %s also holds text-encoder layers (lora_te*): only its transformer layers are applied.",
                       file)
    return converted


def convert_file(source: Path, target: Path, to: str, family: Family | None = None) -> Path:
    """Converts the LoRA file `source` into layout `to` (comfyui = kohya: the family's ComfyUI layout, or
    diffusers) at `target`. `family`: the model family it is for (default: the one its run recorded beside it, else
    the one its layer names say, FLUX.1 where they fit both)."""
    from safetensors.torch import save_file

    state, metadata = read_safetensors(source)
    recorded = trained_family(config_beside(source))
    if to in ("kohya", "comfyui"):
        if _is_comfyui(state):
            raise UserError(f"{source} is already in the kohya/ComfyUI layout.")
        family = family or families.for_lora(list(layers(state, f"LoRA {source}")), recorded)
        config = lora_config(metadata)  # the LoRA config diffusers stores (alpha: the scale is alpha / rank)
        alpha = config.get("lora_alpha")
        if config.get("alpha_pattern") or config.get("rank_pattern"):
            raise UserError(f"{source} has per-layer ranks or alphas in its metadata, which this converter doesn't "
                            "read; save it with flux-qlora (alpha folded in) first.")
        layout = family.lora_layout
        converted = to_kohya({k: v.float() for k, v in state.items() if k.startswith("transformer.")}, alpha, layout)
        metadata = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": layout.base_model,
                    "converted_by": "flux-qlora"}
    elif to == "diffusers":
        family = family or (families.by_name(recorded) if recorded else FLUX1)
        layout = comfyui_layout_of(state, family)
        if layout is None:
            raise UserError(f"{source} is not in the kohya/ComfyUI layout (no lora_unet_* or diffusion_model.* "
                            "keys).")
        converted, metadata = to_diffusers({k: v.float() for k, v in state.items()}, layout), None
    else:
        raise UserError(f"--to {to}: choose comfyui, kohya or diffusers.")
    if not converted:
        raise UserError(f"{source} holds no LoRA layers of a FLUX.1 or FLUX.2 transformer (e.g. "
                        f"{next(iter(state), 'no tensors at all')}): not a Flux LoRA, nothing written.")
    with written_atomically(target) as partial:
        save_file(converted, str(partial), metadata=metadata)
    return target


def _is_comfyui(state: dict) -> bool:
    return any(k.startswith(naming["prefix"]) for naming in NAMINGS for k in state)


def main(argv: list[str] | None = None) -> None:
    from flux_qlora.cli import run_main, setup_logging

    parser = argparse.ArgumentParser(prog="python -m flux_qlora.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="A LoRA .safetensors file.")
    parser.add_argument("output", type=Path, help="Where to write the converted file.")
    parser.add_argument("--to", required=True, choices=["comfyui", "kohya", "diffusers"],
                        help="comfyui and kohya are the same: the layout ComfyUI reads for the model family (FLUX.1: "
                             "lora_unet_*, .alpha; FLUX.2: diffusion_model.*, lora_A/lora_B, the scale folded in).")
    parser.add_argument("--family", choices=families.FAMILY_NAMES, default=None,
                        help="The model family the LoRA is for (default: the one its run recorded in the "
                             "training_config.toml beside it, else the one its layer names say).")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    args = parser.parse_args(argv)
    setup_logging(args.debug)

    def convert(args: argparse.Namespace) -> None:
        if args.output.exists():
            raise UserError(f"{args.output} exists: give a new output path (nothing is overwritten).")
        family = families.by_name(args.family) if args.family else None
        print(f"Wrote {convert_file(args.input, args.output, args.to, family)} ({args.to} layout)")

    run_main(convert, args)


if __name__ == "__main__":
    main()

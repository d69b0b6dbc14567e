"""LoRA files in the other layouts users load: kohya's `lora_unet_*` (what ComfyUI, Forge and kohya's sd-scripts
read and write for FLUX.1) and diffusers' `transformer.*` (what we train and `FluxPipeline.load_lora_weights`
reads), both ways:

    python -m flux_qlora.convert my-lora/pytorch_lora_weights.safetensors my-lora-comfyui.safetensors --to comfyui
    python -m flux_qlora.convert someone-elses-kohya-lora.safetensors diffusers-lora.safetensors --to diffusers

The kohya layout uses FLUX.1's own layer names, where a double block's q, k and v projections are one fused
`img_attn.qkv` (and `txt_attn.qkv`) linear and a single block's q, k, v and MLP input are one `linear1`: their
LoRAs become one LoRA of the fused layer whose down projection stacks theirs and whose up projection is block
diagonal (the missing parts zero), with an `.alpha` tensor per layer that gives the same strength. Back, each part
takes the up projection's rows of its slice and the rank columns that are non-zero there, the scale alpha / rank
folded into them: exact both ways.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch

from flux_qlora.errors import UserError
from flux_qlora.lora import LoraFile, layers, lora_config, read_safetensors
from flux_qlora.run_config import config_beside, trained_base_precision, trained_family

logger = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"
COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"  # the trainer's --export_format copy

# diffusers name inside a double block -> (FLUX.1 name, part, number of parts) ; part None: not fused
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3), "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", None, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3), "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3), "attn.to_add_out": ("txt_attn.proj", None, 1),
    "ff.net.0.proj": ("img_mlp.0", None, 1), "ff.net.2": ("img_mlp.2", None, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", None, 1), "ff_context.net.2": ("txt_mlp.2", None, 1),
    "norm1.linear": ("img_mod.lin", None, 1), "norm1_context.linear": ("txt_mod.lin", None, 1),
}
# inside a single block: linear1 = [q; k; v; mlp] (the MLP part mlp_ratio = 4 times as wide as each of q, k, v)
SINGLE = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", None, 1), "norm.linear": ("modulation.lin", None, 1),
}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE), "single_transformer_blocks": ("single_blocks", SINGLE)}
# the transformer's own linears outside the blocks (norm_out's modulation is left out: its rows are swapped)
TOP = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in"}
LINEAR1_PART_WIDTHS = (1, 1, 1, 4)  # q, k, v, mlp, in units of the model width


def kohya_key(flux_name: str) -> str:
    """'double_blocks.0.img_attn.qkv' -> 'lora_unet_double_blocks_0_img_attn_qkv'."""
    return KOHYA_PREFIX + flux_name.replace(".", "_")


def to_kohya(state: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A diffusers-layout Flux LoRA (`transformer.*` keys; scale alpha / rank, alpha = rank when None: our saved
    files) in the kohya layout, fused layers joined, one `.alpha` per layer keeping every layer's scale."""
    groups: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor, int]]] = {}
    widths: dict[str, int] = {}
    for name, (a, b) in layers(state).items():
        match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
        if name in TOP:
            target, part, parts = TOP[name], None, 1
        elif match is None or match.group(3) not in BLOCKS[match.group(1)][1]:
            raise UserError(f"layer {name} has no FLUX.1 (kohya) name: only the blocks' linear layers, proj_out, "
                            "x_embedder and context_embedder convert.")
        else:
            block_kind, table = BLOCKS[match.group(1)]
            flux_name, part, parts = table[match.group(3)]
            target = f"{block_kind}.{match.group(2)}.{flux_name}"
        scale = (alpha if alpha is not None else a.shape[0]) / a.shape[0]
        groups.setdefault(target, {})[part] = (a, b * scale, parts)
        if part is not None and part < 3:
            widths[target] = b.shape[0]  # q, k, v are each as wide as the model
    kohya = {}
    for target, found in groups.items():
        if None in found:
            a, b, _ = found[None]
        else:
            a, b = _join_parts(found, widths[target] if target in widths else None)
        key = kohya_key(target)
        kohya[f"{key}.lora_down.weight"] = a.contiguous()
        kohya[f"{key}.lora_up.weight"] = b.contiguous()
        kohya[f"{key}.alpha"] = torch.tensor(float(a.shape[0]))  # scale 1: the scales are in the up weights
    return kohya


def _join_parts(found: dict, width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked downs and a block-diagonal up over the fused layer's rows; parts without a LoRA stay zero."""
    parts = next(iter(found.values()))[2]
    if width is None:  # only the MLP part of a linear1: the model width from its rows
        width = found[3][1].shape[0] // LINEAR1_PART_WIDTHS[3]
    rows = [width * (LINEAR1_PART_WIDTHS[i] if parts == 4 else 1) for i in range(parts)]
    present = sorted(found)
    down = torch.cat([found[p][0] for p in present])
    up = torch.zeros(sum(rows), down.shape[0], dtype=down.dtype)
    column = 0
    for p in present:
        a, b, _ = found[p]
        up[sum(rows[:p]) : sum(rows[: p + 1]), column : column + a.shape[0]] = b
        column += a.shape[0]
    return down, up


def to_diffusers(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya-layout FLUX.1 LoRA in the diffusers layout (`transformer.*`), each layer's alpha / rank folded into
    its up weights (so it loads at scale 1 with alpha = rank). The fused layers split by their rows: qkv is 3
    model widths, linear1 7 (q, k, v and the 4-wide MLP)."""
    by_flux_name = {(kind, flux.replace(".", "_")): (block, table)
                    for block, (kind, table) in BLOCKS.items() for flux, _, _ in table.values()}
    state = {}
    for key, down in kohya.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.removesuffix(".lora_down.weight")
        if f"{stem}.lora_up.weight" not in kohya:
            raise UserError(f"{stem} has a lora_down weight without its lora_up: the file is incomplete.")
        up = kohya[f"{stem}.lora_up.weight"]
        scale = float(kohya.get(f"{stem}.alpha", torch.tensor(float(down.shape[0])))) / down.shape[0]
        top = {kohya_key(flux): name for name, flux in TOP.items()}.get(stem)
        if top:
            state[f"transformer.{top}.lora_A.weight"] = down.contiguous()
            state[f"transformer.{top}.lora_B.weight"] = (up * scale).contiguous()
            continue
        match = re.fullmatch(rf"{KOHYA_PREFIX}(double_blocks|single_blocks)_(\d+)_(.+)", stem)
        if match is None or (match.group(1), match.group(3)) not in by_flux_name:
            raise UserError(f"{stem} is not a FLUX.1 transformer layer in the kohya layout (lora_unet_double_blocks_N_"
                            "... / lora_unet_single_blocks_N_...).")
        block, table = by_flux_name[(match.group(1), match.group(3))]
        for name, (flux, part, parts) in table.items():
            if flux.replace(".", "_") != match.group(3):
                continue
            b = up[_part_rows(part, parts, up.shape[0])] * scale
            columns = torch.arange(down.shape[0]) if part is None else b.abs().sum(0).nonzero().flatten()
            if len(columns) == 0:
                continue  # no LoRA on this part of the fused layer
            prefix = f"transformer.{block}.{match.group(2)}.{name}"
            state[f"{prefix}.lora_A.weight"] = down[columns].contiguous()
            state[f"{prefix}.lora_B.weight"] = b[:, columns].contiguous()
    return state


def _part_rows(part: int | None, parts: int, rows: int) -> slice:
    """The rows of `part` of a fused layer of `rows` rows (all of them for an unfused layer)."""
    if part is None:
        return slice(None)
    units = LINEAR1_PART_WIDTHS if parts == 4 else (1,) * parts
    width = rows // sum(units)
    return slice(width * sum(units[:part]), width * sum(units[: part + 1]))


def read_lora_file(path: Path) -> LoraFile:
    """A LoRA file read once, in the diffusers layout: a kohya/ComfyUI one (other trainers', ComfyUI's) converted
    on read (`kohya_as_diffusers`), so every way infer.py serves LoRAs (load, fuse, both hotswaps) reads one
    layout."""
    tensors, metadata = read_safetensors(path)
    converted = kohya_as_diffusers(tensors, path)
    if converted is not None:
        tensors, metadata = converted, {}  # what diffusers saw in the converted copy it was once given
    config = config_beside(path)
    return LoraFile(path, tensors, metadata, trained_base_precision(config), trained_family(config))


def kohya_as_diffusers(state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor] | None:
    """A kohya-layout LoRA's transformer layers in the diffusers layout, at any model width (diffusers' own kohya
    conversion assumes FLUX.1's 3072); None for other layouts, and for kohya files with layers this converter
    doesn't map (their text-encoder parts aside), which are left to diffusers' loaders."""
    if not any(k.startswith(KOHYA_PREFIX) for k in state):
        return None
    transformer_part = {k: v.float() for k, v in state.items() if k.startswith(KOHYA_PREFIX)}
    try:
        converted = to_diffusers(transformer_part)
    except UserError:
        return None
    if len(transformer_part) < len(state):
        logger.warning("LoRA %s also holds text-encoder layers (lora_te*): only its transformer layers are applied.",
                       file)
    return converted


def convert_file(source: Path, target: Path, to: str) -> Path:
    """Converts the LoRA file `source` into layout `to` (comfyui = kohya, or diffusers) at `target`."""
    from safetensors.torch import save_file

    state, metadata = read_safetensors(source)
    is_kohya = any(k.startswith(KOHYA_PREFIX) for k in state)
    if to in ("kohya", "comfyui"):
        if is_kohya:
            raise UserError(f"{source} is already in the kohya/ComfyUI layout.")
        config = lora_config(metadata)  # the LoRA config diffusers stores (alpha: the scale is alpha / rank)
        alpha = config.get("lora_alpha")
        if config.get("alpha_pattern") or config.get("rank_pattern"):
            raise UserError(f"{source} has per-layer ranks or alphas in its metadata, which this converter doesn't "
                            "read; save it with flux-qlora (alpha folded in) first.")
        converted = to_kohya({k: v.float() for k, v in state.items() if k.startswith("transformer.")}, alpha)
        save_file(converted, str(target), metadata={"ss_network_module": "networks.lora_flux",
                                                   "ss_base_model_version": "flux1", "converted_by": "flux-qlora"})
    elif to == "diffusers":
        if not is_kohya:
            raise UserError(f"{source} is not in the kohya/ComfyUI layout (no {KOHYA_PREFIX}* keys).")
        save_file(to_diffusers({k: v.float() for k, v in state.items()}), str(target))
    else:
        raise UserError(f"--to {to}: choose comfyui, kohya or diffusers.")
    return target


def main(argv: list[str] | None = None) -> None:
    from flux_qlora.cli import run_main, setup_logging

    parser = argparse.ArgumentParser(prog="python -m flux_qlora.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="A LoRA .safetensors file.")
    parser.add_argument("output", type=Path, help="Where to write the converted file.")
    parser.add_argument("--to", required=True, choices=["comfyui", "kohya", "diffusers"],
                        help="comfyui and kohya are the same layout (lora_unet_*, FLUX.1 layer names, .alpha).")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    args = parser.parse_args(argv)
    setup_logging(args.debug)

    def convert(args: argparse.Namespace) -> None:
        if args.output.exists():
            raise UserError(f"{args.output} exists: give a new output path (nothing is overwritten).")
        print(f"Wrote {convert_file(args.input, args.output, args.to)} ({args.to} layout)")

    run_main(convert, args)


if __name__ == "__main__":
    main()

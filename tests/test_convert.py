"""LoRAs in the kohya/ComfyUI layout and back: exact round trips, diffusers' own kohya loader as an independent
check, and infer.py serving a kohya file in every mode."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_one_line_error, run_script, tiny_forward
from safetensors.torch import load_file

import infer
from flux_qlora import models
from flux_qlora.convert import KOHYA_PREFIX, convert_file, to_diffusers, to_kohya
from flux_qlora.families.flux1 import FLUX1
from flux_qlora.lora import add_lora, save_lora


@pytest.fixture(scope="module")
def all_linear_lora(tiny_model, tmp_path_factory):
    """Our saved LoRA on every linear layer of the tiny model (rank 4, alpha 8: folded into B), non-zero B, and the
    weight delta of each layer."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    torch.manual_seed(0)
    add_lora(transformer, 4, 8, "gaussian", FLUX1.lora_presets["all-linear"])
    deltas = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
            deltas[name] = (module.lora_B["default"].weight @ module.lora_A["default"].weight
                            * module.scaling["default"]).detach()
    folder = tmp_path_factory.mktemp("all-linear")
    return save_lora(transformer, folder, fold_alpha=True), deltas


def test_diffusers_to_kohya_to_diffusers_is_exact(all_linear_lora, tmp_path):
    path, _ = all_linear_lora
    ours = load_file(path)
    kohya = to_kohya(ours)
    assert all(k.startswith(KOHYA_PREFIX) for k in kohya)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya  # q, k, v fused as in FLUX.1
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in kohya  # q, k, v and the MLP input
    assert kohya["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape[0] == 4 * 4  # four rank-4 parts
    back = to_diffusers(kohya)
    assert set(back) == set(ours)
    for key in ours:
        torch.testing.assert_close(back[key], ours[key], rtol=0, atol=0)


def flux_dev_shaped_lora(rank: int = 4) -> dict[str, torch.Tensor]:
    """A random LoRA in our layout with FLUX.1-dev's layer sizes (width 3072, MLP 12288) on double block 0, single
    block 0 and the output layer: every kind of layer the kohya layout fuses or renames."""
    torch.manual_seed(0)
    sizes = {f"transformer_blocks.0.{n}": (3072, 3072) for n in ["attn.to_q", "attn.to_k", "attn.to_v",
                                                                 "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                                                                 "attn.add_v_proj", "attn.to_add_out"]}
    sizes |= {"transformer_blocks.0.ff.net.0.proj": (3072, 12288), "transformer_blocks.0.ff.net.2": (12288, 3072)}
    sizes |= {f"single_transformer_blocks.0.{n}": (3072, 3072) for n in ["attn.to_q", "attn.to_k", "attn.to_v"]}
    sizes |= {"single_transformer_blocks.0.proj_mlp": (3072, 12288), "single_transformer_blocks.0.proj_out":
              (15360, 3072), "proj_out": (3072, 64)}
    return {key: tensor for name, (fan_in, fan_out) in sizes.items()
            for key, tensor in [(f"transformer.{name}.lora_A.weight", torch.randn(rank, fan_in) / 50),
                                (f"transformer.{name}.lora_B.weight", torch.randn(fan_out, rank) / 50)]}


def test_diffusers_own_kohya_loader_reads_our_kohya_file_as_our_lora(tmp_path):
    """Independently of our converter's way back: diffusers' kohya conversion (FluxLoraLoaderMixin.lora_state_dict,
    written for FLUX.1's sizes, so a FLUX.1-dev-shaped LoRA here) gives every layer the weight delta of ours."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    ours = flux_dev_shaped_lora()
    save_file(to_kohya(ours), str(tmp_path / "kohya.safetensors"))
    theirs = FluxPipeline.lora_state_dict(str(tmp_path), weight_name="kohya.safetensors")
    # diffusers names the output layer "proj_out", without the "transformer." of every other layer
    theirs = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in theirs.items()}
    layers = {k.removesuffix(".lora_A.weight") for k in ours if k.endswith(".lora_A.weight")}
    assert {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")} == layers
    for layer in layers:
        delta = ours[f"{layer}.lora_B.weight"] @ ours[f"{layer}.lora_A.weight"]
        read = theirs[f"{layer}.lora_B.weight"].float() @ theirs[f"{layer}.lora_A.weight"].float()
        torch.testing.assert_close(read, delta, rtol=1e-5, atol=1e-7)


def test_the_fused_layers_alpha_keeps_the_strength(all_linear_lora):
    """Each fused layer's .alpha equals its rank (scale 1: the scale is in the weights), so loaders that read alpha
    (ComfyUI, Forge, diffusers) and loaders that don't give the same strength."""
    path, _ = all_linear_lora
    kohya = to_kohya(load_file(path))
    for key, alpha in kohya.items():
        if key.endswith(".alpha"):
            assert float(alpha) == kohya[key.replace(".alpha", ".lora_down.weight")].shape[0]


@pytest.mark.parametrize("mode", [[], ["--fuse"], ["--hotswap"], ["--hotswap", "fused"]],
                         ids=["load", "fuse", "hotswap-adapter", "hotswap-fused"])
def test_infer_serves_a_kohya_lora_in_every_mode(mode, tiny_model, all_linear_lora, tmp_path):
    from test_infer import hand_applied

    path, deltas = all_linear_lora
    kohya = convert_file(path, tmp_path / "kohya.safetensors", "kohya")
    args = infer.parse_args(["--pretrained_model_name_or_path", str(tiny_model), "--dtype", "fp32", "--lora",
                             str(kohya), *mode])
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_model, dtype=models.DTYPES["fp32"])
    server = infer.apply_loras(pipe, infer.resolve_loras(args), args, torch.device("cpu"))
    server.start()
    server.swap(0)
    expected = tiny_forward(hand_applied(tiny_model, (1.0, deltas)))
    torch.testing.assert_close(tiny_forward(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_the_converter_cli_and_its_mistakes(all_linear_lora, tmp_path):
    path, _ = all_linear_lora
    run_script("-m", "flux_qlora.convert", path, tmp_path / "k.safetensors", "--to", "comfyui")
    run_script("-m", "flux_qlora.convert", tmp_path / "k.safetensors", tmp_path / "d.safetensors", "--to", "diffusers")
    ours, back = load_file(path), load_file(tmp_path / "d.safetensors")
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    for args, fragments in [((path, tmp_path / "k.safetensors", "--to", "kohya"), ["exists", "new output path"]),
                            ((path, tmp_path / "x.safetensors", "--to", "diffusers"), ["not in the kohya"]),
                            ((tmp_path / "nope.safetensors", tmp_path / "y.safetensors", "--to", "kohya"),
                             ["nope.safetensors", "does not exist"])]:
        assert_one_line_error(run_script("-m", "flux_qlora.convert", *args, check=False), *fragments)


def test_trainer_exports_comfyui_the_card_says_how_and_infer_warns_of_another_base(tiny_model, tiny_images_master,
                                                                                  tiny_embeddings, tmp_path):
    from helpers import VALIDATION, train_args

    output = tmp_path / "lora"
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, output,
                                                  "--max_train_steps", "2", "--export_format", "comfyui",
                                                  "--lora_alpha", "8", "--instance_prompt", "sks shapes",
                                                  "--validation_prompt", VALIDATION, "--validation_inference_steps",
                                                  "2", "--learning_rate", "1e-2"))
    ours, comfy = load_file(output / "pytorch_lora_weights.safetensors"), load_file(
        output / "pytorch_lora_weights_comfyui.safetensors")
    assert all(k.startswith(KOHYA_PREFIX) for k in comfy) and any(k.endswith(".alpha") for k in comfy)
    back = to_diffusers(comfy)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    card = (output / "README.md").read_text()
    for fragment in ["Trigger / instance prompt: `sks shapes`", "NF4 base", "rank 4, alpha 8", "64x48",
                     "pytorch_lora_weights_comfyui.safetensors", "LoraLoaderModelOnly", "load_lora_weights",
                     "![a red circle"]:
        assert fragment in card, fragment
    result = run_script("infer.py", "--pretrained_model_name_or_path", tiny_model, "--lora", output, "--prompt", "x",
                        "--height", "32", "--width", "32", "--num_inference_steps", "1", "--output_dir",
                        tmp_path / "out")
    assert "trained on a NF4 base and is served on a bf16 base" in result.stderr


def test_a_lora_saved_with_alpha_other_than_rank_converts_at_its_strength(tiny_model, tmp_path):
    """A diffusers file whose alpha (in its saved LoRA config) is not its rank, as a checkpoint's LoRA is: the
    converter applies alpha / rank, so it gives the kohya file of the same LoRA saved with alpha folded in."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    torch.manual_seed(0)
    add_lora(transformer, 4, 8, "gaussian", FLUX1.lora_presets["attention"])
    for module in transformer.modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    unfolded = save_lora(transformer, tmp_path / "unfolded")
    folded = save_lora(transformer, tmp_path / "folded", fold_alpha=True)
    for path in (unfolded, folded):
        convert_file(path, path.parent / "kohya.safetensors", "kohya")
    from_unfolded = load_file(tmp_path / "unfolded" / "kohya.safetensors")
    from_folded = load_file(tmp_path / "folded" / "kohya.safetensors")
    assert from_unfolded.keys() == from_folded.keys()
    for key in from_folded:
        torch.testing.assert_close(from_unfolded[key], from_folded[key], rtol=0, atol=0)

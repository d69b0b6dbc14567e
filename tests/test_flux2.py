"""FLUX.2 [klein] and [dev] on their tiny models: the embeddings and latents equal the diffusers pipelines' own, the
trainer runs the whole path (NF4, LoRA, 8-bit AdamW, checkpointing, cached latents, eval loss, sample images), and
diffusers loads the LoRA it writes. Files of one family are refused on another."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, built_once, run_script, train_args

from flux_qlora import families
from flux_qlora.embeddings import read_embeddings
from flux_qlora.errors import UserError
from flux_qlora.families.flux2 import DEV, KLEIN
from flux_qlora.tiny import build_tiny_pipeline

PROMPT = "a red circle on a green background"
FAMILIES = {"klein": KLEIN, "dev": DEV}


@pytest.fixture(scope="session", params=["klein", "dev"])
def flux2(request, tmp_path_factory, tiny_images_master) -> dict:
    """The tiny pipeline of a FLUX.2 variant, its embeddings and a 6-step training run, built once per test run."""
    family = FAMILIES[request.param]

    def build(folder: Path) -> Path:
        model = build_tiny_pipeline(folder / "model", family=family.name)
        run_script("compute_embeddings.py", "--pretrained_model_name_or_path", model, "--instance_data_dir",
                   tiny_images_master, "--output_path", folder / "embeddings.parquet", "--validation_prompt", PROMPT,
                   "--max_sequence_length", "24", "--device", "cpu")
        run_script("train_qlora_flux.py", *train_args(
            model, tiny_images_master, folder / "embeddings.parquet", folder / "lora", "--max_train_steps", "6",
            "--checkpointing_steps", "3", "--learning_rate", "1e-3", "--lora_layers", "all-linear",
            "--validation_prompt", PROMPT, "--validation_inference_steps", "2", "--validation_split", "0.34",
            "--eval_steps", "3", "--mixed_precision", "no", "--export_format", "comfyui"))
        return folder

    folder = built_once(tmp_path_factory, f"flux2-{request.param}", build)
    return {"family": family, "model": folder / "model", "embeddings": folder / "embeddings.parquet",
            "lora": folder / "lora"}


def skip_dev(flux2: dict, why: str) -> None:
    """Runs a test for [klein] only where [dev] would take the same path again (the suite's time is bounded)."""
    if flux2["family"] is DEV:
        pytest.skip(f"[klein] covers [dev] here: {why}")


def pipeline(flux2: dict):
    return flux2["family"].pipeline_cls().from_pretrained(flux2["model"], dtype=torch.float32)


def test_embeddings_equal_the_pipelines_encode_prompt(flux2, tiny_images_master):
    table = read_embeddings(flux2["embeddings"])
    assert table.manifest["family"] == flux2["family"].name
    assert table.pooled_prompt_embeds.shape == (len(table.keys), 0)  # FLUX.2 has no pooled vector
    captions = [(tiny_images_master / f"{i:03d}.txt").read_text() for i in range(2)]
    pipe = pipeline(flux2)
    expected, text_ids = pipe.encode_prompt(captions, max_sequence_length=24)
    rows = [table.captions.index(c) for c in captions]
    torch.testing.assert_close(table.prompt_embeds[rows], expected.float())
    torch.testing.assert_close(table.text_ids, text_ids[0].float())  # (t, h, w, l) = (0, 0, 0, token)
    torch.testing.assert_close(flux2["family"].text_ids(24), text_ids[0].float())


@pytest.mark.parametrize("size", [(64, 96), (48, 32)])
def test_latents_and_positions_equal_the_pipelines(size, flux2):
    """Normalized by the VAE's BatchNorm over 2x2 patches and packed, our cached latents are the pipeline's tokens
    (channel order included), and the image positions are its (t, h, w, l) ids."""
    from flux_qlora import flow
    from flux_qlora.batches import encode_latents

    skip_dev(flux2, "both variants share the VAE and the packing")

    pipe = pipeline(flux2)
    pixels = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = encode_latents(pipe.vae, pixels, show_progress=False)
    theirs = pipe._encode_vae_image(pixels.float() / 127.5 - 1, None)
    torch.testing.assert_close(flow.pack_latents(ours), pipe._pack_latents(theirs), rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.2 and abs(float(pipe.vae.bn.running_mean.abs().max())) > 0.1  # normalization did something
    ids = flux2["family"].image_ids(*ours.shape[-2:])
    torch.testing.assert_close(ids, pipe._prepare_latent_ids(theirs)[0].to(ids.dtype))


def test_run_trains_checkpoints_evaluates_and_samples(flux2):
    lora_dir, family = flux2["lora"], flux2["family"]
    summary = json.loads((lora_dir / "train_summary.json").read_text())
    assert summary["steps"] == 6 and len(summary["losses"]) == 6
    assert summary["nf4_layers"] == 2 * 12 + 2 * 2 + 3  # every linear of the 2 + 2 blocks, the shared modulation
    assert [step for step, _ in summary["eval_losses"]] == [0, 3, 6]
    assert (lora_dir / "checkpoint-3" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((lora_dir / "checkpoint-3" / "training_state.json").read_text())["family"] == family.name
    assert len(summary["samples_after"]) == 1 and (lora_dir / summary["samples_after"][0]).stat().st_size > 100
    card = (lora_dir / "README.md").read_text()
    assert f"A {family.label} LoRA" in card and f"from diffusers import {family.pipeline_classes[0]}" in card
    assert f'[run]\nmodel_family = "{family.name}"' in (lora_dir / "training_config.toml").read_text()


def flux2_forward(transformer, family) -> torch.Tensor:
    """The tiny FLUX.2 transformer on fixed random inputs (12 image tokens, 5 text tokens)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return family.forward(transformer, torch.randn(1, 12, 32, generator=g), torch.tensor([0.7]),
                              torch.tensor([3.5]) if family.guidance_embeds else None,
                              torch.randn(1, 5, 96, generator=g), torch.zeros(1, 0),
                              torch.tensor([[0.0, 0, 0, i] for i in range(5)]), family.image_ids(6, 8))


def test_diffusers_load_lora_weights_reproduces_trained_model(flux2):
    """Flux2(Klein)Pipeline.load_lora_weights on the same NF4 base gives the trained model's output."""
    from flux_qlora.lora import add_lora, load_lora_into, target_modules
    from flux_qlora.models import load_transformer, quantize_to_nf4

    family, model = flux2["family"], flux2["model"]
    trained = load_transformer(str(model), "cpu", torch.float32)
    add_lora(trained, 4, None, "gaussian", target_modules("all-linear", family, trained.config))
    load_lora_into(trained, flux2["lora"])
    pipe = pipeline(flux2)
    quantize_to_nf4(pipe.transformer, "cpu")
    before = flux2_forward(pipe.transformer, family)
    pipe.load_lora_weights(flux2["lora"])
    after = flux2_forward(pipe.transformer, family)
    torch.testing.assert_close(after, flux2_forward(trained, family), rtol=1e-4, atol=1e-5)
    assert (after - before).abs().max() > 1e-4  # and the LoRA does change the output


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_image(flux2, tiny_images_master, tmp_path):
    """As FLUX.1's (test_train.py), with more steps: the tiny FLUX.2 model learns more slowly (0.72x in 60 steps at
    3e-3, 0.54x in 90 at 5e-3, measured)."""
    skip_dev(flux2, "the training path is the same")
    one = tmp_path / "one"
    one.mkdir()
    for suffix in (".png", ".txt"):
        shutil.copy(tiny_images_master / f"000{suffix}", one)
    run_script("train_qlora_flux.py", *train_args(
        flux2["model"], one, flux2["embeddings"], tmp_path / "out", "--max_train_steps", "90", "--rank", "16",
        "--learning_rate", "5e-3", "--lora_layers", "all-linear", "--checkpointing_steps", "1000"))
    losses = json.loads((tmp_path / "out" / "train_summary.json").read_text())["losses"]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.7 * first, (first, last)


def test_files_of_another_family_are_refused(flux2, tiny_model, tiny_embeddings, tiny_images_master, tmp_path):
    family = flux2["family"]
    # A FLUX.1 parquet on a FLUX.2 model, and this FLUX.2 parquet on FLUX.1.
    result = run_script("train_qlora_flux.py", *train_args(flux2["model"], tiny_images_master, tiny_embeddings,
                                                          tmp_path / "a"), check=False)
    assert_one_line_error(result, "--data_df_path", f"made for FLUX.1, this model is {family.label}")
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, flux2["embeddings"],
                                                          tmp_path / "b"), check=False)
    assert_one_line_error(result, "--data_df_path", f"made for {family.label}, this model is FLUX.1")


def test_family_is_read_from_the_pipeline_or_the_transformer(flux2, tiny_model, tmp_path):
    family = flux2["family"]
    assert families.detect(str(flux2["model"])) is family
    assert families.detect(str(flux2["model"] / "transformer")) is family  # guidance embeddings: [dev] only
    assert families.detect(str(tiny_model)) is families.by_name("flux1")
    other = tmp_path / "other"
    shutil.copytree(flux2["model"], other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionXLPipeline: flux-qlora trains FLUX.1"):
        families.detect(str(other))


def served(flux2: dict, *flags: str):
    """The FLUX.2 pipeline with infer.py's LoRA handling (on the CPU, fp32), and its LoRA server."""
    import infer

    args = infer.parse_args(["--pretrained_model_name_or_path", str(flux2["model"]), "--dtype", "fp32", *flags])
    pipe = pipeline(flux2)
    return pipe, infer.apply_loras(pipe, infer.resolve_loras(args, flux2["family"]), args, torch.device("cpu"))


def test_infer_fuses_blends_and_hotswaps_flux2_loras_alike(flux2):
    family, lora = flux2["family"], str(flux2["lora"])
    loaded = flux2_forward(served(flux2, "--lora", lora)[0].transformer, family)
    fused = served(flux2, "--lora", lora, "--fuse")[0].transformer
    assert not any("lora" in name for name, _ in fused.named_parameters())
    torch.testing.assert_close(flux2_forward(fused, family), loaded, rtol=1e-4, atol=1e-5)
    halves = served(flux2, "--lora", lora, "--lora_scale", "0.5", "--lora", lora, "--lora_scale", "0.5")[0]
    torch.testing.assert_close(flux2_forward(halves.transformer, family), loaded, rtol=1e-4, atol=1e-5)
    pipe, server = served(flux2, "--hotswap", "fused", "--lora", lora)
    server.start()
    server.swap(0)
    torch.testing.assert_close(flux2_forward(pipe.transformer, family), loaded, rtol=1e-4, atol=1e-5)


def test_infer_draws_the_same_image_from_prompts_and_from_freed_encoders(flux2, tmp_path):
    """Also the family's defaults: guidance 4.0, classifier-free for klein base from the empty prompt's embeddings
    once its encoder is freed."""
    skip_dev(flux2, "klein's negative prompt is what differs")
    images = {}
    for name, extra in (("prompts", []), ("embeddings", ["--free_text_encoders"])):
        run_script("infer.py", "--pretrained_model_name_or_path", flux2["model"], "--lora", flux2["lora"],
                   "--prompt", PROMPT, "--height", "48", "--width", "64", "--num_inference_steps", "3",
                   "--output_dir", tmp_path / name, *extra)
        (png,) = (tmp_path / name).glob("*.png")
        images[name] = png
    from PIL import Image

    settings = json.loads(Image.open(images["prompts"]).text["flux_qlora"])
    assert settings["guidance_scale"] == 4.0 and settings["steps"] == 3
    assert Image.open(images["prompts"]).tobytes() == Image.open(images["embeddings"]).tobytes()


def test_klein_distilled_serves_at_four_steps_and_refuses_a_dev_lora(flux2, tmp_path):
    from PIL import Image

    if flux2["family"] is DEV:  # a [klein] LoRA on [dev]: the training_config.toml beside it names its family
        klein = built_once_path(flux2, "flux2-klein")
        result = run_script("infer.py", "--pretrained_model_name_or_path", flux2["model"], "--lora", klein / "lora",
                            "--prompt", PROMPT, "--output_dir", tmp_path, check=False)
        assert_one_line_error(result, "--lora", "made for FLUX.2 [klein], this model is FLUX.2 [dev]")
        return
    distilled = tmp_path / "distilled"
    shutil.copytree(flux2["model"], distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    run_script("infer.py", "--pretrained_model_name_or_path", distilled, "--lora", flux2["lora"], "--prompt", PROMPT,
               "--height", "48", "--width", "64", "--output_dir", tmp_path / "images")
    (png,) = (tmp_path / "images").glob("*.png")
    settings = json.loads(Image.open(png).text["flux_qlora"])
    assert (settings["steps"], settings["guidance_scale"]) == (4, 1.0)


def built_once_path(flux2: dict, name: str) -> Path:
    """The folder another variant's fixture built (both are built in one test run: the fixture is parametrized)."""
    folder = flux2["model"].parent.parent / name
    if not (folder / "lora" / "pytorch_lora_weights.safetensors").exists():
        pytest.skip(f"{name} was not built in this run (run the whole file)")
    return folder


def test_validation_model_draws_on_the_distilled_model_with_the_lora(flux2, tiny_images_master, tmp_path):
    """--validation_model: klein base's LoRA sampled on the distilled model (here the same weights, told distilled),
    the LoRA's current weights on its transformer: the same outputs as the trained model's; its own defaults."""
    from flux_qlora.lora import add_lora, load_lora_into, target_modules
    from flux_qlora.models import load_transformer
    from flux_qlora.validation import SampleSettings, lora_on_other_model

    skip_dev(flux2, "klein: base for training, distilled for serving")
    distilled = tmp_path / "distilled"
    shutil.copytree(flux2["model"], distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    trained = load_transformer(str(flux2["model"]), "cpu", torch.float32)
    add_lora(trained, 4, None, "gaussian", target_modules("all-linear", KLEIN, trained.config))
    load_lora_into(trained, flux2["lora"])
    settings = SampleSettings({}, 64, 48, 4, 1.0, 0, model=str(distilled), distilled=True)
    with lora_on_other_model(settings, trained, torch.float32, torch.device("cpu")) as other:
        assert other is not trained
        torch.testing.assert_close(flux2_forward(other, KLEIN), flux2_forward(trained, KLEIN))

    # The trainer's sample settings for it: the distilled model's own step count and guidance, no CFG.
    import train_qlora_flux

    args = train_qlora_flux.parse_args([str(a) for a in train_args(
        flux2["model"], tiny_images_master, flux2["embeddings"], tmp_path / "out", "--validation_prompt", PROMPT,
        "--validation_model", distilled)])
    settings = train_qlora_flux.validate_args(args).for_model(KLEIN, dict(trained.config), args.lora_layers)
    samples = train_qlora_flux.sample_settings(args, settings, read_embeddings(flux2["embeddings"]),
                                               torch.device("cpu"))
    assert (samples.steps, samples.guidance_scale, samples.distilled, samples.model) == (4, 1.0, True, str(distilled))


def test_comfyui_export_round_trips_and_diffusers_loads_it(flux2, tmp_path):
    """The trainer's --export_format comfyui copy: ComfyUI's FLUX.2 names (diffusion_model.*, fused qkv, the scale
    folded in, no .alpha), back to ours exactly, and diffusers' own FLUX.2 loader gives the trained model's output."""
    from safetensors.torch import load_file, save_file

    from flux_qlora.convert import COMFYUI_WEIGHT_NAME, read_lora_file, to_diffusers

    family = flux2["family"]
    ours = load_file(flux2["lora"] / "pytorch_lora_weights.safetensors")
    comfy = load_file(flux2["lora"] / COMFYUI_WEIGHT_NAME)
    assert all(k.startswith("diffusion_model.") for k in comfy) and not any(k.endswith(".alpha") for k in comfy)
    a = comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    assert a.shape[0] == 3 * 4  # q, k and v's rank-4 LoRAs as one
    for name in ("single_blocks.1.linear1", "single_blocks.1.linear2", "double_blocks.1.txt_mlp.2",
                 "double_stream_modulation_img.lin", "final_layer.linear"):
        assert f"diffusion_model.{name}.lora_B.weight" in comfy, name
    back = to_diffusers(comfy, family.lora_layout)
    assert set(back) == set(ours)
    for key in ours:  # alpha = rank in our saved files: nothing to fold, so exact
        torch.testing.assert_close(back[key], ours[key], rtol=0, atol=0)
    # infer.py reads the ComfyUI file as the same LoRA
    assert set(read_lora_file(flux2["lora"] / COMFYUI_WEIGHT_NAME, family).tensors) == set(ours)
    # diffusers' own FLUX.2 loader (its ai-toolkit path splits the fused qkv its own way)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    from flux_qlora.models import quantize_to_nf4

    theirs, mine = pipeline(flux2), pipeline(flux2)
    quantize_to_nf4(theirs.transformer, "cpu")
    quantize_to_nf4(mine.transformer, "cpu")
    theirs.load_lora_weights(str(tmp_path), weight_name="comfy.safetensors")
    mine.load_lora_weights(flux2["lora"])
    torch.testing.assert_close(flux2_forward(theirs.transformer, family), flux2_forward(mine.transformer, family),
                               rtol=1e-4, atol=1e-5)


def test_the_converter_names_the_family_it_converts_for(flux2, tmp_path):
    """`python -m flux_qlora.convert` reads the family the run recorded beside the LoRA; --family overrides."""
    from safetensors.torch import load_file

    skip_dev(flux2, "the same layout")

    run_script("-m", "flux_qlora.convert", flux2["lora"] / "pytorch_lora_weights.safetensors",
               tmp_path / "comfy.safetensors", "--to", "comfyui")
    assert all(k.startswith("diffusion_model.") for k in load_file(tmp_path / "comfy.safetensors"))
    run_script("-m", "flux_qlora.convert", tmp_path / "comfy.safetensors", tmp_path / "back.safetensors", "--to",
               "diffusers", "--family", flux2["family"].name)
    assert set(load_file(tmp_path / "back.safetensors")) == set(
        load_file(flux2["lora"] / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(flux2, tiny_images_master, tmp_path):
    """--compile on FLUX.2's blocks (its single blocks get one joint stream: no text stream to make alike): one
    graph per block kind, the same first losses as the fixture's eager run (eval loss and samples draw from streams
    of their own, so they don't move the training's)."""
    skip_dev(flux2, "the blocks are the same")
    run_script("train_qlora_flux.py", *train_args(
        flux2["model"], tiny_images_master, flux2["embeddings"], tmp_path / "compiled", "--max_train_steps", "2",
        "--learning_rate", "1e-3", "--lora_layers", "all-linear", "--validation_split", "0.34",
        "--mixed_precision", "no", "--checkpointing_steps", "1000", "--compile"))
    compiled = json.loads((tmp_path / "compiled" / "train_summary.json").read_text())
    eager = json.loads((flux2["lora"] / "train_summary.json").read_text())
    assert compiled["graphs_compiled"] == 2
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"][:2]), rtol=1e-4,
                               atol=1e-5)


def test_cudnn_training_hands_flux2_attention_gradients_contiguous(monkeypatch):
    """FLUX.2's single blocks concatenate attention's output with the MLP's inside their processor: without the
    family's fix the attention backward gets sliced (non-contiguous) gradients, which PyTorch's cuDNN kernel reads
    with a cached graph's strides (Family.give_attention_contiguous_gradients); with it, every one is contiguous
    and no gradient changes."""
    from diffusers.models.transformers import transformer_flux2

    from flux_qlora.families.flux2 import tiny_transformer
    from flux_qlora.hardware import Device, pick_attention_backend

    original = transformer_flux2.dispatch_attention_fn
    monkeypatch.setattr(transformer_flux2, "dispatch_attention_fn", original)  # the process-wide wrap undone after
    seen: list[bool] = []

    def probe(*args, **kwargs):  # sees the gradient each attention's backward gets
        out = original(*args, **kwargs)
        out.register_hook(lambda grad: seen.append(grad.is_contiguous()))
        return out

    grads, contiguous = {}, {}
    for fixed in (False, True):
        transformer_flux2.dispatch_attention_fn = probe
        torch.manual_seed(0)
        transformer = tiny_transformer(KLEIN)
        if fixed:
            KLEIN.give_attention_contiguous_gradients(transformer)
            KLEIN.give_attention_contiguous_gradients(transformer)  # once per process: a second call wraps nothing
        seen.clear()
        g = torch.Generator().manual_seed(0)
        out = KLEIN.forward(transformer, torch.randn(1, 12, 32, generator=g), torch.tensor([0.7]), None,
                            torch.randn(1, 5, 96, generator=g), torch.zeros(1, 0), KLEIN.text_ids(5),
                            KLEIN.image_ids(6, 8))
        out.square().sum().backward()
        contiguous[fixed] = list(seen)
        grads[fixed] = {n: p.grad for n, p in transformer.named_parameters() if p.grad is not None}
    assert False in contiguous[False] and contiguous[True] == [True] * len(contiguous[False])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=0)

    # Asked for, cuDNN trains FLUX.2; the Hopper default stays flash until a GPU has measured cuDNN against it.
    h100 = Device("cuda", (9, 0), "NVIDIA H100", 79.1)
    for family in (KLEIN, DEV):
        rules = dict(prefer_cudnn=family.prefer_cudnn_attention)
        assert pick_attention_backend("_native_cudnn", h100, torch.bfloat16, **rules) == "_native_cudnn"
        assert pick_attention_backend(None, h100, torch.bfloat16, **rules) == "_native_flash"
    assert pick_attention_backend(None, h100, torch.bfloat16) == "_native_cudnn"  # FLUX.1's

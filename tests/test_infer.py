"""infer.py on the tiny model: LoRA loading, blending, fusing and hotswapping agree with the maths done by hand."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_one_line_error, assert_refused, run_script, tiny_forward
from PIL import Image
from safetensors.torch import load_file, save_file

import infer
from flux_qlora import blocks, models
from flux_qlora.cuda_graphs import replay_forward_from_cuda_graphs
from flux_qlora.hardware import Device
from flux_qlora.lora import add_lora, save_lora

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def make_lora(model_dir, folder, rank: int, seed: int, alpha: int | None = None) -> dict[str, torch.Tensor]:
    """A LoRA written with peft + save_lora, with non-zero B; returns each layer's weight delta (scale * B @ A)."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    torch.manual_seed(seed)
    add_lora(transformer, rank, alpha, "gaussian", TARGETS)
    deltas = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            deltas[name] = (b @ a * module.scaling["default"]).detach()
    save_lora(transformer, folder)
    return deltas


def hand_applied(model_dir, *weighted_deltas) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    with torch.no_grad():
        for weight, deltas in weighted_deltas:
            for name, delta in deltas.items():
                transformer.get_submodule(name).weight += weight * delta
    return transformer


def pipeline_and_server(model_dir, *flags, dtype: str = "fp32"):
    """A tiny pipeline (on the CPU) with infer.py's LoRA handling, and its LoRA server."""
    from diffusers import FluxPipeline

    args = infer.parse_args(["--pretrained_model_name_or_path", str(model_dir), "--dtype", dtype, *flags])
    pipe = FluxPipeline.from_pretrained(model_dir, dtype=models.DTYPES[dtype])
    return pipe, infer.apply_loras(pipe, infer.resolve_loras(args), args, torch.device("cpu"))


def pipeline_with(model_dir, *flags):
    return pipeline_and_server(model_dir, *flags)[0]


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: (root / name, make_lora(tiny_model, root / name, rank, seed))
            for name, rank, seed in [("a", 4, 1), ("b", 8, 2)]}


def test_loaded_lora_equals_weights_applied_by_hand(tiny_model, loras):
    folder, deltas = loras["a"]
    pipe = pipeline_with(tiny_model, "--lora", str(folder))
    expected = tiny_forward(hand_applied(tiny_model, (1.0, deltas)))
    torch.testing.assert_close(tiny_forward(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_fused_equals_unfused(tiny_model, loras):
    folder, _ = loras["a"]
    unfused = tiny_forward(pipeline_with(tiny_model, "--lora", str(folder)).transformer)
    fused = pipeline_with(tiny_model, "--lora", str(folder), "--fuse").transformer
    assert not any("lora" in name for name, _ in fused.named_parameters())  # merged and unloaded
    torch.testing.assert_close(tiny_forward(fused), unfused, rtol=1e-4, atol=1e-5)


def test_blend_is_the_weighted_sum_of_deltas(tiny_model, loras):
    (fa, da), (fb, db) = loras["a"], loras["b"]
    pipe = pipeline_with(tiny_model, "--lora", str(fa), "--lora_scale", "0.7",
                         "--lora", str(fb), "--lora_scale", "-0.3")
    expected = tiny_forward(hand_applied(tiny_model, (0.7, da), (-0.3, db)))
    torch.testing.assert_close(tiny_forward(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_hotswap_into_compiled_transformer_equals_fresh_load_without_recompiling(tiny_model, loras):
    import torch._dynamo.utils as dynamo_utils

    (fa, _), (fb, _) = loras["a"], loras["b"]  # rank 4, then rank 8
    torch._dynamo.reset()
    pipe, server = pipeline_and_server(tiny_model, "--hotswap", "--lora", str(fa), "--lora", str(fb))
    assert server.rounds == [str(fa), str(fb)]
    server.start()
    pipe.transformer.compile(fullgraph=True, backend="eager")  # dynamo's guards and graphs, no code generation
    tiny_forward(pipe.transformer)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    server.swap(1)
    swapped = tiny_forward(pipe.transformer)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation
    fresh = tiny_forward(pipeline_with(tiny_model, "--lora", str(fb)).transformer)
    torch.testing.assert_close(swapped, fresh, rtol=1e-4, atol=1e-5)


def test_fused_hotswap_into_compiled_transformer_merges_each_lora_exactly(tiny_model, loras, tmp_path):
    """--hotswap fused: each swap leaves the weights the original ones plus that LoRA's delta (another rank and
    scale, other layers included), without recompiling; swapping back restores the first LoRA bit for bit."""
    import torch._dynamo.utils as dynamo_utils

    (fa, da), (fb, db) = loras["a"], loras["b"]
    fc = tmp_path / "c"
    dc = make_lora(tiny_model, fc, rank=8, seed=3, alpha=4)  # scale 0.5, where a and b have 1.0
    torch._dynamo.reset()
    pipe, server = pipeline_and_server(tiny_model, "--hotswap", "fused", *sum((["--lora", str(f)] for f in
                                                                                (fa, fc, fb)), []))
    server.start()
    pipe.transformer.compile(fullgraph=True, backend="eager")
    outputs = {"a": tiny_forward(pipe.transformer)}
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    for index, name in [(1, "c"), (2, "b"), (0, "a again")]:
        server.swap(index)
        outputs[name] = tiny_forward(pipe.transformer)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation
    for name, deltas in [("a", da), ("c", dc), ("b", db)]:
        expected = tiny_forward(hand_applied(tiny_model, (1.0, deltas)))
        torch.testing.assert_close(outputs[name], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(outputs["a again"], outputs["a"])


@pytest.mark.gpu  # the device's dtype and attention backend, peaks by stage
def test_cli_generates_with_metadata_fuses_saves_and_requantizes(tiny_model, loras, tmp_path):
    folder, _ = loras["a"]
    run_script("infer.py", "--pretrained_model_name_or_path", tiny_model, "--lora", folder, "--fuse",
               "--save_fused", tmp_path / "fused", "--quantize", "nf4", "--prompt", "a red circle",
               "--prompt", "a blue square", "--height", "48", "--width", "64", "--num_inference_steps", "3",
               "--output_dir", tmp_path / "out", "--benchmark", "1")
    images = sorted((tmp_path / "out").glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (64, 48)
    red = next(p for p in images if "a_red_circle" in p.name)  # the prompt is in the name
    settings = json.loads(Image.open(red).text["flux_qlora"])
    assert settings["prompt"] == "a red circle" and settings["steps"] == 3 and settings["seed"] == 0
    assert (tmp_path / "fused" / "config.json").exists()
    run_script("infer.py", "--pretrained_model_name_or_path", tiny_model, "--lora", folder, "--prompt", "a red circle",
               "--height", "48", "--width", "64", "--num_inference_steps", "3", "--output_dir", tmp_path / "out")
    again = sorted((tmp_path / "out").glob("*.png"))
    assert len(again) == 3 and set(images) < set(again)  # the same prompt and seed again: a new name, nothing lost
    assert any(p.stem.endswith("-2") for p in again)
    benchmark = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert benchmark[0]["s_per_image"] > 0
    if torch.cuda.is_available():  # the timed images' peaks by stage; the overall one holds them
        stages = benchmark[0]["denoising_peak_gib"], benchmark[0]["decode_peak_gib"]
        assert all(stage > 0 for stage in stages) and benchmark[0]["peak_memory_gib"] >= max(stages)


@pytest.mark.gpu  # bitsandbytes' CUDA NF4 kernels
def test_nf4_loads_straight_to_nf4_and_draws_what_quantizing_after_loading_draws(tiny_model, loras, tmp_path):
    """--quantize nf4 without --fuse loads the transformer tensor by tensor into NF4 (the full-precision one never
    in RAM: FLUX.1-dev's 24 GB on a 12.7 GB Colab VM), with the LoRA unmerged on it: the same image as a
    full-precision pipeline quantized after loading (the path of a pipeline handed to infer.main)."""
    from diffusers import FluxPipeline

    folder, _ = loras["a"]
    flags = ["--pretrained_model_name_or_path", str(tiny_model), "--lora", str(folder), "--quantize", "nf4",
             "--dtype", "fp32", "--prompt", "a red circle", "--height", "32", "--width", "32",
             "--num_inference_steps", "3"]
    result = run_script("infer.py", *flags, "--output_dir", tmp_path / "streamed")
    assert "linear layers in NF4" in result.stderr  # models.load_transformer's line: loaded as NF4
    pipe = FluxPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    infer.main(infer.parse_args([*flags, "--output_dir", str(tmp_path / "after")]), pipe=pipe)
    assert models.count_nf4_layers(pipe.transformer) > 0
    streamed, after = (next((tmp_path / name).glob("*.png")) for name in ("streamed", "after"))
    assert (torch.tensor(list(Image.open(streamed).getdata())) == torch.tensor(list(Image.open(after).getdata()))).all()


@pytest.mark.gpu  # compiled on the GPU
@pytest.mark.parametrize("mode", ["adapter", "fused"])
def test_cli_hotswap_compiled_counts_no_new_graphs(mode, tiny_model, loras, tmp_path):
    (fa, _), (fb, _) = loras["a"], loras["b"]
    run_script("infer.py", "--pretrained_model_name_or_path", tiny_model, "--hotswap", mode, "--lora", fa, "--lora", fb,
               "--compile", "--prompt", "a red circle", "--height", "32", "--width", "32",
               "--num_inference_steps", "2", "--output_dir", tmp_path / "out", "--dtype", "fp32",
               "--compile_cache_dir", tmp_path / "cache")
    rounds = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert [r["lora"] for r in rounds] == [str(fa), str(fb)]
    assert rounds[0]["new_graphs"] == 2 and rounds[1]["new_graphs"] == 0  # one graph per block kind
    assert len(list((tmp_path / "cache").glob("*.torchcompile"))) == 1  # what the next run loads (test_train)


def test_a_small_gpu_is_told_the_flags_that_fit_before_anything_loads():
    t4, h100 = Device("cuda", (7, 5), "Tesla T4", 14.76), Device("cuda", (9, 0), "NVIDIA H100", 79.1)
    advice = infer.small_gpu_advice(t4, infer.parse_args(["--prompt", "x"]))
    assert advice == ("Tesla T4 (compute capability 7.5) has 14.8 GiB: FLUX.1-dev fits it with --quantize nf4 "
                      "--quantize_text_encoder nf4 --free_text_encoders (or --cpu_offload, slower); without, expect "
                      "to run out of GPU memory.")
    assert "fits it with --free_text_encoders (" in infer.small_gpu_advice(
        t4, infer.parse_args(["--prompt", "x", "--quantize", "nf4", "--quantize_t5"]))
    for enough in (["--quantize", "nf4", "--quantize_t5", "--free_text_encoders"], ["--cpu_offload"]):
        assert infer.small_gpu_advice(t4, infer.parse_args(["--prompt", "x", *enough])) is None
    assert infer.small_gpu_advice(h100, infer.parse_args(["--prompt", "x"])) is None
    assert infer.small_gpu_advice(Device("cpu"), infer.parse_args(["--prompt", "x"])) is None


@pytest.mark.gpu  # T5 and CLIP freed from the GPU
def test_freed_text_encoders_draw_the_same_images(tiny_model, loras, tmp_path):
    """--free_text_encoders: every prompt encoded first, T5 and CLIP freed, the images drawn from the embeddings:
    pixel for pixel what the pipeline draws from the prompts, over hotswapped LoRAs and the timed images."""
    (fa, _), (fb, _) = loras["a"], loras["b"]
    common = ["--pretrained_model_name_or_path", tiny_model, "--hotswap", "--lora", fa, "--lora", fb,
              "--prompt", "a red circle", "--prompt", "a blue square", "--height", "32", "--width", "48",
              "--num_inference_steps", "2", "--dtype", "fp32", "--benchmark", "1"]
    run_script("infer.py", *common, "--output_dir", tmp_path / "prompts")
    result = run_script("infer.py", *common, "--free_text_encoders", "--output_dir", tmp_path / "embeddings")
    assert "the text encoders freed" in result.stderr
    drawn = sorted(path.name for path in (tmp_path / "prompts").glob("*.png"))
    assert len(drawn) == 4 and drawn == sorted(path.name for path in (tmp_path / "embeddings").glob("*.png"))
    for name in drawn:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "prompts" / name)),
                              np.asarray(Image.open(tmp_path / "embeddings" / name))), name
    timed = json.loads((tmp_path / "embeddings" / "benchmark.json").read_text())
    assert len(timed) == 2 and all(r["s_per_image"] > 0 for r in timed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (runs on the device machine)")
def test_cuda_graphs_replay_hotswapped_loras_like_fresh_eager_loads(tiny_model, loras, tmp_path):
    """The graph is captured with LoRA a; after swapping in c (another rank and scale) replays must use c."""
    (fa, _), (fb, _) = loras["a"], loras["b"]
    fc = tmp_path / "c"
    make_lora(tiny_model, fc, rank=8, seed=3, alpha=4)  # scale 0.5, where a and b have 1.0
    device = torch.device("cuda")

    def latents(pipe) -> torch.Tensor:
        return pipe("a red circle", height=32, width=32, num_inference_steps=5, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(0)).images

    def eager(folder) -> torch.Tensor:
        pipe, server = pipeline_and_server(tiny_model, "--lora", str(folder))
        infer.place_on_device(pipe, infer.parse_args([]), device)
        server.start()
        return latents(pipe)

    pipe, server = pipeline_and_server(tiny_model, "--hotswap", "--lora", str(fa), "--lora", str(fb), "--lora",
                                       str(fc))
    infer.place_on_device(pipe, infer.parse_args([]), device)
    server.start()  # the hotswap scales move to the GPU with the weights, or the graph would bake in a's
    replay_forward_from_cuda_graphs(pipe.transformer)
    graphed = {"a": latents(pipe)}
    for name, index in [("c", 2), ("b", 1)]:
        server.swap(index)
        graphed[name] = latents(pipe)
    assert [len(step.graphs) for step in pipe.transformer.forward.steps.values()] == [1]  # captured once
    for name, folder in [("a", fa), ("c", fc), ("b", fb)]:
        torch.testing.assert_close(graphed[name], eager(folder), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(graphed["a"], graphed["c"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs a GPU of compute capability >= 8.9 (runs on the device machine)")
def test_fused_hotswap_requantizes_fp8_in_place_under_cuda_graphs(tiny_model, loras, tmp_path, monkeypatch):
    """Swapped a -> c after FP8 quantization and graph capture gives what c fused first, then quantized, gives."""
    fa, _ = loras["a"]
    fc = tmp_path / "c"
    make_lora(tiny_model, fc, rank=8, seed=3, alpha=4)
    monkeypatch.setattr(blocks, "FP8_MIN_FEATURES", 16)  # the tiny model's layers are narrower than FLUX.1-dev's
    device = torch.device("cuda")

    def served(loras: list, graphs: bool) -> tuple[list[torch.Tensor], int]:
        flags = ["--hotswap", "fused", "--fp8", *sum((["--lora", str(f)] for f in loras), [])]
        pipe, server = pipeline_and_server(tiny_model, *flags, dtype="bf16")
        args = infer.parse_args(flags + (["--cuda_graphs"] if graphs else []))
        infer.place_on_device(pipe, args, device)
        server.start()
        infer.speed_up(pipe, args, server)
        outputs = []
        for index in range(len(loras)):
            server.swap(index)
            outputs.append(pipe("a red circle", height=32, width=32, num_inference_steps=5, output_type="latent",
                                generator=torch.Generator("cpu").manual_seed(0)).images)
        fp8_layers = sum(hasattr(m.weight, "qdata") for m in pipe.transformer.modules() if hasattr(m, "weight"))
        return outputs, fp8_layers

    (graphed_a, graphed_c), fp8_layers = served([fa, fc], graphs=True)
    (fresh_c,), _ = served([fc], graphs=False)
    assert fp8_layers > 10
    torch.testing.assert_close(graphed_c, fresh_c, rtol=0, atol=1e-3)
    assert (graphed_a - graphed_c).abs().max() > 0.05


def _lora_for_another_model(folder, tmp_path) -> str:
    """The LoRA with its down projections 96 wide, which no layer of the tiny model is."""
    state = load_file(folder / "pytorch_lora_weights.safetensors")
    save_file({k: torch.zeros(v.shape[0], 96) if ".lora_A." in k else v for k, v in state.items()},
              tmp_path / "other.safetensors")
    return str(tmp_path / "other.safetensors")


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real out-of-memory needs a GPU (the device machine)")
def test_running_out_of_gpu_memory_is_one_line_naming_flags_that_use_less(tiny_model, loras, tmp_path):
    """Capped at 1 MiB (bench/emulate_gpu.py) the tiny pipeline can't even move to the GPU: torch's OOM paragraph
    and traceback become one line with the sizes and this script's flags that use less."""
    folder, _ = loras["a"]
    result = run_script("infer.py", "--pretrained_model_name_or_path", tiny_model, "--lora", folder, "--prompt", "a",
                        "--height", "32", "--width", "32", "--num_inference_steps", "2", "--output_dir", tmp_path,
                        check=False, launcher=[sys.executable, str(ROOT / "bench" / "emulate_gpu.py"), "0.001"])
    assert_one_line_error(result, "out of GPU memory", "more needed", "allowed to this process", "--quantize nf4",
                          "--cpu_offload")


@pytest.mark.parametrize("flags, expect", [
    pytest.param(["--hotswap", "--hotswap_target_rank", "2"], ["rank 4", "--hotswap_target_rank"],
                 id="rank_above_target"),
    pytest.param(["--lora", "{other}"], ["doesn't fit", "another model"], id="other_model"),
    pytest.param(["--lora", "{other}", "--hotswap", "fused"], ["doesn't fit", "another model"], id="fused_other_model"),
    pytest.param(["--lora", "{tmp}/nope.safetensors"], ["nope.safetensors", "no such file"], id="missing"),
    pytest.param(["--fp8"], ["--fp8", "8.9"], id="fp8_on_cpu", marks=NO_GPU),
    pytest.param(["--cuda_graphs", "--device", "cpu"], ["--cuda_graphs", "NVIDIA GPU"], id="graphs_on_cpu"),
    pytest.param(["--lora", "{nan}"], ["NaN/inf", "earlier checkpoint"], id="nan_lora"),
    pytest.param(["--lora", "{sdxl}"], ["no FLUX.1 or FLUX.2 layers", "another model family"], id="sdxl_lora"),
    pytest.param(["--output_dir", "{tmp}/file.txt"], ["file.txt", "give a folder path"], id="output_dir_is_a_file"),
    pytest.param(["--prompt_file", "{tmp}/nope.txt"], ["--prompt_file", "nope.txt", "does not exist"],
                 id="missing_prompt_file"),
    # A flag-only mistake (the others: test_flag_mistakes_are_refused_before_anything_loads): the script runs
    # validate_args first, and its refusal is one `error:` line, exit code 2, no traceback.
    pytest.param(["--compile_cache_dir", "{tmp}/cache"], ["--compile_cache_dir", "add --compile"],
                 id="compile_cache_without_compile"),
])
def test_bad_input_gives_one_clear_line(flags, expect, tiny_model, loras, tmp_path):
    """Each case adds its flags to a run with LoRA a (a case that names its own --lora runs that one alone)."""
    folder, _ = loras["a"]
    other = _lora_for_another_model(folder, tmp_path) if "{other}" in flags else ""
    state = load_file(folder / "pytorch_lora_weights.safetensors")
    save_file({k: v * float("nan") for k, v in state.items()}, tmp_path / "nan.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)},
              tmp_path / "sdxl.safetensors")
    (tmp_path / "file.txt").write_text("a file where a folder should be")
    flags = [f.format(tmp=tmp_path, other=other, nan=tmp_path / "nan.safetensors", sdxl=tmp_path / "sdxl.safetensors")
             for f in flags]
    lora = [] if "--lora" in flags else ["--lora", str(folder)]
    result = run_script("infer.py", "--pretrained_model_name_or_path", tiny_model, "--prompt", "x", "--height", "32",
                        "--width", "32", "--output_dir", tmp_path / "out", *lora, *flags, check=False)
    assert_one_line_error(result, *expect)


@pytest.mark.parametrize("flags, expect", [
    pytest.param(["--lora_scale", "0.5", "--lora_scale", "0.5"], ["--lora_scale"], id="scales"),
    pytest.param(["--hotswap", "fused", "--quantize", "nf4"], ["--hotswap fused", "--quantize nf4"], id="fused_nf4"),
    pytest.param(["--lora_scale", "nan"], ["--lora_scale", "nan", "finite"], id="nan_scale"),
    pytest.param(["--guidance_scale", "inf"], ["--guidance_scale", "inf", "finite"], id="inf_guidance"),
    pytest.param(["--max_sequence_length", "0"], ["--max_sequence_length 0", "between 1 and 512"], id="no_tokens"),
    pytest.param(["--max_sequence_length", "600"], ["--max_sequence_length 600", "between 1 and 512"],
                 id="too_many_tokens"),
    pytest.param(["--fuse", "--save_fused", "{tmp}"], ["--save_fused", "already exists"], id="save_fused_exists"),
    pytest.param(["--num_inference_steps", "0"], ["--num_inference_steps", "at least 1"], id="no_steps"),
    pytest.param(["--free_text_encoders", "--cpu_offload"], ["--cpu_offload", "drop --free_text_encoders"],
                 id="free_with_offload"),
])
def test_flag_mistakes_are_refused_before_anything_loads(flags, expect, tiny_model, tmp_path):
    """validate_args in-process, with one --lora that nothing reads (the subprocess table's
    `compile_cache_without_compile` case: how such a refusal reaches the user)."""
    flags = [f.format(tmp=tmp_path) for f in flags]
    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--prompt", "x", "--height", "32", "--width", "32",
            "--output_dir", str(tmp_path / "out"), "--lora", str(tmp_path / "lora"), *flags]
    assert_refused(lambda: infer.validate_args(infer.parse_args(argv)), *expect)

"""train_qlora_flux.py run as users run it, on the tiny model, with NF4 + LoRA + AdamW8bit on the CPU."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    ACCELERATE,
    CPU_ONLY,
    GOLDEN_FLAGS,
    GOLDEN_LOSSES,
    RESUMED_FLAGS,
    VALIDATION,
    assert_one_line_error,
    assert_refused,
    assert_same_lora,
    built_once,
    run_script,
    tiny_forward,
    train_args,
)
from safetensors.torch import load_file

import train_qlora_flux
from flux_qlora.batches import SampleOrder
from flux_qlora.nf4 import cpu_fp8_gemm_runs


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_images_master, tiny_embeddings, tmp_path_factory) -> Path:
    """A 6-step run through `accelerate launch`, trained once for every worker (read-only for the tests)."""
    def build(folder: Path) -> Path:
        run_script("train_qlora_flux.py", *train_args(
            tiny_model, tiny_images_master, tiny_embeddings, folder / "lora", "--max_train_steps", "6",
            "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--validation_prompt", VALIDATION,
            "--report_to", "tensorboard", "--learning_rate", "1e-3"), launcher=ACCELERATE)
        return folder / "lora"

    return built_once(tmp_path_factory, "trained", build)


@pytest.mark.gpu  # the default path: accelerate's config (bf16), the device's attention backend, samples drawn there
def test_run_writes_lora_checkpoints_and_reports(trained):
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["steps"] == 6 and len(summary["losses"]) == 6
    assert summary["predicted_peak_gpu_memory_gib"] > 0 and summary["skipped_steps"] == 0  # the memory plan's
    assert summary["nf4_layers"] == 2 * 14 + 2 * 6  # every linear of the 2 double + 2 single blocks was NF4
    # --checkpoints_total_limit 2 at steps 2, 4 (no checkpoint at the last step: the LoRA is written instead)
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (trained / "checkpoint-4" / "pytorch_lora_weights.safetensors").exists()
    assert (trained / "loss.png").stat().st_size > 1000
    assert [p.name for p in sorted((trained / "samples").iterdir())] == ["step-000000-0.png", "step-000006-0.png"]
    assert list((trained / "logs").rglob("events.out.tfevents*"))
    assert "base_model:" in (trained / "README.md").read_text()


def test_lora_keys_metadata_and_training_moved_them(trained):
    from flux_qlora.lora import read_lora_metadata

    state = load_file(trained / "pytorch_lora_weights.safetensors")
    assert state and all(k.startswith("transformer.") for k in state)
    assert any(".attn.to_q.lora_A." in k for k in state) and any(".to_out.0.lora_B." in k for k in state)
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero with gaussian init: training changed it
    metadata = read_lora_metadata(trained / "pytorch_lora_weights.safetensors")
    assert metadata["r"] == 4 and metadata["lora_alpha"] == 4
    assert set(metadata["target_modules"]) == {"to_k", "to_q", "to_v", "to_out.0"}


def test_diffusers_load_lora_weights_reproduces_trained_model(trained, tiny_model):
    """FluxPipeline.load_lora_weights on the same NF4 base gives the trained model's output."""
    from diffusers import FluxPipeline

    from flux_qlora.lora import add_lora, load_lora_into
    from flux_qlora.models import load_transformer, quantize_to_nf4

    trained_model = load_transformer(str(tiny_model), "cpu", torch.float32)
    add_lora(trained_model, 4, None, "gaussian", ["to_k", "to_q", "to_v", "to_out.0"])
    load_lora_into(trained_model, trained)

    pipe = FluxPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    quantize_to_nf4(pipe.transformer, "cpu")
    before = tiny_forward(pipe.transformer)
    pipe.load_lora_weights(trained)
    torch.testing.assert_close(tiny_forward(pipe.transformer), tiny_forward(trained_model), rtol=1e-4, atol=1e-5)
    assert (tiny_forward(pipe.transformer) - before).abs().max() > 1e-4  # and the LoRA does change the output


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_image(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    for suffix in (".png", ".txt"):
        shutil.copy(tiny_images_master / f"000{suffix}", one)
    run_script("train_qlora_flux.py", *train_args(
        tiny_model, one, tiny_embeddings, tmp_path / "out", "--max_train_steps", "60", "--rank", "16",
        "--learning_rate", "3e-3", "--lora_layers", "all-linear", "--checkpointing_steps", "1000"))
    losses = json.loads((tmp_path / "out" / "train_summary.json").read_text())["losses"]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.7 * first, (first, last)


@pytest.fixture(scope="module")
def plain_fp32_run(tiny_model, tiny_images_master, tiny_embeddings, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("plain") / "out"
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, output,
                                                  *GOLDEN_FLAGS), env=CPU_ONLY)
    return {"env": CPU_ONLY, "summary": json.loads((output / "train_summary.json").read_text())}


def test_first_losses_match_the_golden_values(plain_fp32_run):
    # rtol: other CPUs (AVX2 / AVX-512 kernels) sum in other orders; a real change moves these by far more.
    torch.testing.assert_close(torch.tensor(plain_fp32_run["summary"]["losses"]), torch.tensor(GOLDEN_LOSSES),
                               rtol=1e-4, atol=0)


@pytest.mark.slow
def test_resume_from_latest_equals_uninterrupted_run(resumed_run, tiny_model, tiny_images_master, tiny_embeddings,
                                                    tmp_path):
    log = (resumed_run / "resumed.log").read_text()
    assert "Resumed from" in log and "checkpoint-3 at step 3" in log
    assert_same_lora(resumed_run / "full", resumed_run / "interrupted")
    summary = json.loads((resumed_run / "interrupted" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and len(summary["losses"]) == 6

    # Resuming that checkpoint with another rank is refused in one line, not a size-mismatch traceback.
    other = tmp_path / "other-rank"
    other.mkdir()
    shutil.copytree(resumed_run / "full" / "checkpoint-3", other / "checkpoint-3")
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, other,
                                                           *RESUMED_FLAGS, "--resume_from_checkpoint", "latest",
                                                           "--rank", "8"), check=False)
    assert_one_line_error(result, "checkpoint-3 is of another run", "--rank: 4 -> 8")


def test_flat_lora_computes_in_bf16_and_keeps_fp32_master_weights():
    from flux_qlora.step import FlatLora

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))
    exact = torch.cat([a.detach().reshape(-1), b.detach().reshape(-1)])
    flat = FlatLora([a, b], torch.bfloat16)
    assert a.dtype == b.dtype == torch.bfloat16 and flat.master.dtype == torch.float32
    torch.testing.assert_close(flat.master.detach(), exact, rtol=0, atol=0)  # no rounding through bf16
    for _ in range(2):  # two micro steps: gradients add up in fp32
        (a.float().sum() + 2 * b.float().sum()).backward()
        flat.after_backward()
        assert a.grad is None
    torch.testing.assert_close(flat.master.grad, torch.cat([torch.full((32,), 2.0), torch.full((32,), 4.0)]))
    with torch.no_grad():
        flat.master.add_(1e-3)  # an optimizer step smaller than bf16's resolution at these values
    flat.sync()
    torch.testing.assert_close(a.detach(), (exact[:32] + 1e-3).view(4, 8).bfloat16())
    with flat.master_weights():  # what saving and loading see: the fp32 weights, exactly
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.detach().reshape(-1), exact[:32] + 1e-3, rtol=0, atol=0)
        a.data.fill_(0.5)  # a load writes into the master
    assert a.dtype == torch.bfloat16 and bool((a == 0.5).all()) and bool((flat.master[:32] == 0.5).all())


def test_sample_order_shards_each_epoch_without_repeats():
    order = SampleOrder(bucket_sizes=[5], repeats=2, batch_size=2, num_processes=2, seed=1)
    assert order.micro_steps_per_epoch == 2  # 10 positions // global batch 4
    seen = [order.batch(step, rank) for step in range(2) for rank in range(2)]
    positions = torch.cat([p for _, p in seen])
    assert len(positions) == 8 and torch.bincount(positions, minlength=5).max() <= 2
    single = SampleOrder(bucket_sizes=[5], repeats=2, batch_size=4, num_processes=1, seed=1)
    assert torch.equal(single.batch(1, 0)[1], torch.cat([order.batch(1, 0)[1], order.batch(1, 1)[1]]))


@dataclass
class Case:
    """What a bad-input case's setup may change or copy: a fresh image folder, its own tmp folder (--output_dir is
    tmp/out), the trained run of this module, the session's embeddings."""

    images: Path
    tmp: Path
    trained: Path
    embeddings: Path


def _edit_caption(case: Case) -> None:
    (case.images / "001.txt").write_text("an edited caption")


def _copy_checkpoint(case: Case) -> None:
    """--output_dir (tmp/out) holding the trained run's checkpoint-4."""
    shutil.copytree(case.trained / "checkpoint-4", case.tmp / "out" / "checkpoint-4")


def _damage_checkpoint(case: Case) -> None:
    _copy_checkpoint(case)
    (case.tmp / "out" / "checkpoint-4" / "pytorch_lora_weights.safetensors").write_bytes(b"")


def _file_as_output_dir(case: Case) -> None:
    (case.tmp / "out").write_text("a file, not a folder")


def _bad_parquets(case: Case) -> None:
    """Next to the good embeddings: a truncated copy, a text file, one with NaN rows and one of other widths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.read_table(case.embeddings)
    (case.tmp / "truncated.parquet").write_bytes(case.embeddings.read_bytes()[:2000])
    (case.tmp / "text.parquet").write_text("image_hash,caption\n")
    embeds = source["prompt_embeds"].to_pylist()
    embeds[0] = [float("nan")] * len(embeds[0])
    nan = source.set_column(source.column_names.index("prompt_embeds"), "prompt_embeds",
                            pa.array(embeds, type=source.schema.field("prompt_embeds").type))
    pq.write_table(nan.replace_schema_metadata(source.schema.metadata), case.tmp / "nan.parquet")
    from flux_qlora.embeddings import EmbeddingsWriter, read_embeddings

    table = read_embeddings(case.embeddings)
    writer = EmbeddingsWriter(case.tmp / "wide.parquet", {"pretrained_model_name_or_path": "other"})
    writer.write(table.keys, table.captions, torch.zeros(len(table.keys), 16, 99), table.pooled_prompt_embeds,
                 table.text_ids.expand(len(table.keys), -1, -1))
    writer.finish(table.keys)


def _elongated_image(case: Case) -> None:
    """Image 000 as a 640x8 strip, with its embeddings under the new hash (tmp/elongated.parquet)."""
    from PIL import Image

    from flux_qlora.data import image_hash
    from flux_qlora.embeddings import EmbeddingsWriter, read_embeddings

    before = image_hash(Image.open(case.images / "000.png"))
    Image.open(case.images / "000.png").resize((640, 8)).save(case.images / "000.png")
    after = image_hash(Image.open(case.images / "000.png"))
    table = read_embeddings(case.embeddings)
    keys = [after if key == before else key for key in table.keys]
    writer = EmbeddingsWriter(case.tmp / "elongated.parquet", {"pretrained_model_name_or_path": "tiny"})
    writer.write(keys, table.captions, table.prompt_embeds, table.pooled_prompt_embeds,
                 table.text_ids.expand(len(keys), -1, -1))
    writer.finish(keys)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (runs on the device machine)")


@pytest.mark.parametrize("flags, expect, setup", [
    pytest.param(["--data_df_path", "{tmp}/nope.parquet"], ["nope.parquet", "compute_embeddings.py"], None,
                 id="missing_parquet"),
    pytest.param([], ["caption(s) changed", "re-run compute_embeddings.py"], _edit_caption, id="stale_caption"),
    pytest.param(["--resume_from_checkpoint", "{tmp}/ckpt"], ["--resume_from_checkpoint", "latest"], None,
                 id="bad_resume"),
    pytest.param(["--train_batch_size", "64"], ["less than one global batch"], None, id="tiny_dataset"),
    # What the device can run, refused once the accelerator has picked it.
    pytest.param(["--do_fp8_training", "--compile", "--mixed_precision", "no"],
                 ["--do_fp8_training", "--mixed_precision bf16"], None, id="fp8_on_nf4_in_fp32"),
    pytest.param(["--do_fp8_training", "--base_precision", "bf16"], ["--do_fp8_training", "8.9"], None,
                 id="fp8_on_cpu", marks=NO_GPU),
    pytest.param(["--cuda_graphs"], ["--cuda_graphs", "NVIDIA GPU"], None, id="graphs_on_cpu", marks=NO_GPU),
    pytest.param(["--cuda_graphs", "--mixed_precision", "fp16"], ["--cuda_graphs", "--mixed_precision bf16"], None,
                 id="graphs_with_fp16", marks=[GPU, pytest.mark.gpu]),
    # The model's sizes.
    pytest.param(["--rank", "100000"], ["--rank 100000", "width"], None, id="rank_above_width"),
    # Paths and files.
    pytest.param([], ["--output_dir", "can't be written"], _file_as_output_dir, id="output_dir_is_a_file"),
    pytest.param(["--output_dir", "/proc/flux-qlora/out"], ["--output_dir /proc/flux-qlora/out", "can't be written"],
                 None, id="output_dir_unwritable"),
    pytest.param(["--data_df_path", "{tmp}/truncated.parquet"], ["truncated.parquet", "not a readable parquet"],
                 _bad_parquets, id="truncated_parquet"),
    pytest.param(["--data_df_path", "{tmp}/text.parquet"], ["text.parquet", "not a readable parquet"], _bad_parquets,
                 id="not_a_parquet"),
    pytest.param(["--data_df_path", "{tmp}/nan.parquet"], ["nan.parquet", "NaN/inf", "re-run compute_embeddings.py"],
                 _bad_parquets, id="nan_embeddings"),
    pytest.param(["--data_df_path", "{tmp}/wide.parquet"], ["99 wide", "joint_attention_dim", "other text encoders"],
                 _bad_parquets, id="other_text_encoders"),
    pytest.param(["--data_df_path", "{tmp}/elongated.parquet"], ["000.png", "too elongated", "crop the image"],
                 _elongated_image, id="elongated_image"),
    # Checkpoints: another run's, damaged, finished, or of other layers.
    pytest.param([], ["already holds another run", "--resume_from_checkpoint latest", "--overwrite_output_dir"],
                 _copy_checkpoint, id="other_runs_checkpoints"),
    # (the trained run's --learning_rate: a resume must train the same maths)
    pytest.param(["--resume_from_checkpoint", "latest", "--max_train_steps", "4", "--learning_rate", "1e-3"],
                 ["step 4", "--max_train_steps is 4", "nothing to train"], _copy_checkpoint, id="resume_past_end"),
    pytest.param(["--resume_from_checkpoint", "latest", "--max_train_steps", "6", "--learning_rate", "1e-3"],
                 ["checkpoint-4 is damaged", "delete checkpoint-4"], _damage_checkpoint, id="damaged_checkpoint"),
    pytest.param(["--resume_from_checkpoint", "latest", "--max_train_steps", "6", "--learning_rate", "1e-3",
                  "--lora_layers", "attention+context"],
                 ["of another run", "--lora_layers: attention -> attention+context"], _copy_checkpoint,
                 id="resume_other_layers"),
    # A flag-only mistake (the others: test_flag_mistakes_are_refused_before_anything_loads): the script runs
    # validate_args first, and its refusal is one `error:` line, exit code 2, no traceback.
    pytest.param(["--width", "100"], ["--width 100", "multiple of 16", "try 96"], None, id="resolution"),
])
def test_bad_input_gives_one_clear_line(flags, expect, setup, tiny_model, tiny_images, tiny_embeddings, trained,
                                        tmp_path):
    if setup:
        setup(Case(tiny_images, tmp_path, trained, tiny_embeddings))
    flags = [f.format(tmp=tmp_path) for f in flags]  # the last --data_df_path given wins
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images, tiny_embeddings, tmp_path / "out"),
                        "--max_train_steps", "1", *flags, check=False)
    assert_one_line_error(result, *expect)


@pytest.mark.parametrize("flags, expect", [
    pytest.param(["--do_fp8_training"], ["--do_fp8_training", "add --compile"], id="fp8_on_nf4_uncompiled"),
    pytest.param(["--cuda_graphs", "--offload_activations"], ["--cuda_graphs", "--offload_activations"],
                 id="graphs_with_offload"),
    pytest.param(["--compile_cache_dir", "{tmp}/cache"], ["--compile_cache_dir", "add --compile"],
                 id="compile_cache_without_compile"),
    pytest.param(["--compile", "--compile_cache_dir", "{tmp}/file.txt"], ["file.txt", "is a file"],
                 id="compile_cache_dir_is_a_file"),
    pytest.param(["--validate_ema"], ["--validate_ema", "--use_ema"], id="validate_ema_without_ema"),
    pytest.param(["--validation_split", "0.2", "--eval_data_dir", "{tmp}"],
                 ["--validation_split", "--eval_data_dir", "not both"], id="validation_split_and_eval_dir"),
    # Values torch or the run would take badly.
    pytest.param(["--checkpoints_total_limit", "-1"], ["--checkpoints_total_limit -1", "at least 1"],
                 id="total_limit_negative"),
    pytest.param(["--checkpoints_total_limit", "0"], ["--checkpoints_total_limit 0", "leave it out"],
                 id="total_limit_zero"),
    pytest.param(["--learning_rate=-1e-4"], ["--learning_rate -0.0001", "at least 0"], id="negative_lr"),
    pytest.param(["--learning_rate", "nan"], ["--learning_rate nan"], id="nan_lr"),
    pytest.param(["--adam_beta1", "1.5"], ["--adam_beta1 1.5", "below 1"], id="beta1"),
    pytest.param(["--adam_beta2", "-0.1"], ["--adam_beta2 -0.1", "at least 0"], id="beta2"),
    pytest.param(["--adam_epsilon", "-1"], ["--adam_epsilon -1.0"], id="epsilon"),
    pytest.param(["--max_grad_norm", "-1"], ["--max_grad_norm -1.0"], id="grad_norm"),
    pytest.param(["--lora_alpha", "0"], ["--lora_alpha 0", "positive"], id="alpha_zero"),
    pytest.param(["--timestep_shift", "nan"], ["--timestep_shift nan", "positive"], id="nan_shift"),
    pytest.param(["--validation_split", "1"], ["--validation_split 1", "below 1"], id="validation_split"),
])
def test_flag_mistakes_are_refused_before_anything_loads(flags, expect, tiny_model, tiny_images_master,
                                                         tiny_embeddings, tmp_path):
    """validate_args in-process (the subprocess table's `resolution` case: how such a refusal reaches the user)."""
    (tmp_path / "file.txt").write_text("not a folder")
    flags = [f.format(tmp=tmp_path) for f in flags]
    argv = [*map(str, train_args(tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out")),
            "--max_train_steps", "1", *flags]
    assert_refused(lambda: train_qlora_flux.validate_args(train_qlora_flux.parse_args(argv)), *expect)


def test_checkpointing_every_nth_block_saves_memory_and_keeps_gradients(tiny_model):
    from flux_qlora.blocks import route_block_calls
    from flux_qlora.lora import add_lora, lora_parameters
    from flux_qlora.models import load_transformer

    def grads_and_saved_bytes(interval: int | None):
        torch.manual_seed(0)
        transformer = load_transformer(str(tiny_model), "cpu", torch.float32)
        add_lora(transformer, 4, None, "gaussian", ["to_k", "to_q", "to_v", "to_out.0"])
        for p in lora_parameters(transformer):
            torch.nn.init.normal_(p, std=0.1)  # non-zero B too, so every LoRA weight gets a gradient
        if interval:
            route_block_calls(transformer, interval)
        transformer.train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = tiny_forward(transformer, grad=True)
        out.square().mean().backward()
        return [p.grad.clone() for p in lora_parameters(transformer)], sum(saved)

    plain, plain_bytes = grads_and_saved_bytes(None)
    every, every_bytes = grads_and_saved_bytes(1)
    half, half_bytes = grads_and_saved_bytes(2)
    for a, b, c in zip(plain, every, half):
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(c, a)
    assert every_bytes < half_bytes < plain_bytes, (every_bytes, half_bytes, plain_bytes)



@pytest.mark.parametrize("device", ["cpu", *([pytest.param("cuda", marks=pytest.mark.gpu)]
                                              if torch.cuda.is_available() else [])])
def test_offloaded_activations_give_the_same_gradients(tiny_model, device):
    from flux_qlora.blocks import route_block_calls
    from flux_qlora.lora import add_lora, lora_parameters
    from flux_qlora.models import load_transformer
    from flux_qlora.step import ActivationOffload, offload_activations

    torch.manual_seed(0)
    transformer = load_transformer(str(tiny_model), device, torch.float32)
    add_lora(transformer, 4, None, "gaussian", ["to_k", "to_q", "to_v", "to_out.0"])
    for p in lora_parameters(transformer):
        torch.nn.init.normal_(p, std=0.1)
    route_block_calls(transformer, 1)
    transformer.train()

    def grads(offload):
        transformer.zero_grad()
        with offload:
            out = tiny_forward(transformer.to(device), grad=True, device=device)
        out.square().mean().backward()
        return [p.grad.clone() for p in lora_parameters(transformer)]

    offload = ActivationOffload(transformer, torch.device(device), min_bytes=0)
    disabled = offload_activations(transformer, torch.device(device), enabled=False)
    for a, b in zip(grads(offload), grads(disabled)):
        torch.testing.assert_close(a, b)
    # The blocks' inputs went out (4 blocks; the rotary embedding they share once), the weights stayed.
    assert len(offload.entries) >= 4
    assert all(e.host.is_floating_point() for e in offload.entries)  # no packed NF4 weight among them


@pytest.mark.gpu  # GPU kernels timed
@pytest.mark.parametrize("steps", [8, 5])  # 5: the run ends inside the profiled steps 5-7 (its exit crashed once)
def test_profile_dir_writes_trace_and_tables(steps, tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out",
                                                  "--max_train_steps", str(steps), "--profile_dir",
                                                  tmp_path / "profile"))
    assert json.loads((tmp_path / "profile" / "trace.json").read_text())["traceEvents"]
    assert "aten::" in (tmp_path / "profile" / "top_cpu.txt").read_text()  # the CPU side of steps 5-7
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["median_s_per_step"] > 0
    if torch.cuda.is_available():  # the GPU machine: kernels timed, a busy share; a memory snapshot needs --compile
        assert summary["gpu_kernel_s_per_step"] > 0 and summary["gpu_busy_percent"] > 0
        assert not (tmp_path / "profile" / "memory_snapshot.pickle").exists()
        assert summary["peak_reserved_gpu_memory_gib"] >= summary["peak_gpu_memory_gib"] > 0
    else:  # no GPU: no kernels, and no busy share claimed
        assert summary["gpu_kernel_s_per_step"] == 0 and summary["gpu_busy_percent"] is None
        assert summary["peak_gpu_memory_gib"] == summary["peak_reserved_gpu_memory_gib"] == 0


def test_report_to_wandb_logs_scalars_and_sample_images(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (not on the GPU machine)")
    run_script("train_qlora_flux.py", *train_args(
        tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out", "--max_train_steps", "2",
        "--report_to", "wandb", "--validation_prompt", VALIDATION),
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert b"peak_memory_gib" in next(run.glob("run-*.wandb")).read_bytes()
    assert len(list((run / "files" / "media" / "images").rglob("*.png"))) == 2  # before and after training


def test_prequantized_nf4_checkpoint_loads_without_requantizing(tiny_model, tmp_path):
    """A transformer saved with its NF4 weights (bitsandbytes' state-dict layout) loads back to the same model."""
    from safetensors.torch import save_file

    from flux_qlora.models import count_nf4_layers, load_transformer

    quantized = load_transformer(str(tiny_model), "cpu", torch.float32)
    state = {k: v.contiguous().clone() for k, v in quantized.state_dict().items()}
    assert any(k.endswith(".weight.absmax") for k in state)  # packed weights + their quantization state
    folder = tmp_path / "nf4-transformer"
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    shutil.copy(tiny_model / "transformer" / "config.json", folder)
    reloaded = load_transformer(str(folder), "cpu", torch.float32)
    assert count_nf4_layers(reloaded) == 40
    torch.testing.assert_close(tiny_forward(reloaded), tiny_forward(quantized))


@pytest.mark.gpu  # accelerate's loss scaler
@pytest.mark.parametrize("compile_flags", [[], ["--compile"]])
def test_fp16_trains_and_counts_skipped_steps(compile_flags, tiny_model, tiny_images_master, tiny_embeddings,
                                              tmp_path):
    """fp16 (T4, V100): NF4 computing in fp16, 8-bit AdamW, eager and compiled; on a GPU through accelerate's loss
    scaler."""
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out",
                                                  "--max_train_steps", "3", "--mixed_precision", "fp16",
                                                  *compile_flags))
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert len(summary["losses"]) == 3 and all(0 < loss < 10 for loss in summary["losses"])
    assert summary["skipped_steps"] <= 1  # the scaler's first scale (65536) may overflow once on a GPU
    assert all(v.isfinite().all() for v in load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors").values())


def test_bf16_base_trains_without_nf4_layers(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out",
                                                  "--max_train_steps", "2", "--base_precision", "bf16"))
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["nf4_layers"] == 0 and summary["steps"] == 2
    assert load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")


@pytest.mark.slow
def test_speed_ups_keep_the_step_zero_loss_and_compile_cache_dir_starts_warm(tiny_model, tiny_images_master,
                                                                             tiny_embeddings, tmp_path):
    """--compile (fused NF4, compiled checkpoints), partial checkpointing, offloaded activations and the flat LoRA
    buffer change the speed and memory, not the maths. And --compile_cache_dir: the same run again on a "fresh
    machine" (empty local inductor caches) takes its graphs from the folder instead of compiling, skips a damaged
    file there with a warning, and trains the same; both report when start-up ended."""
    folder = tmp_path / "compile-cache"
    summaries = []
    for run in ("first", "fresh-machine"):  # the first with this machine's inductor cache, the second with none
        empty = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty")} if run == "fresh-machine" else {}
        env = {**CPU_ONLY, **empty}
        result = run_script("train_qlora_flux.py", *train_args(
            tiny_model, tiny_images_master, tiny_embeddings, tmp_path / run, "--max_train_steps", "1",
            "--mixed_precision", "no", "--compile", "--gradient_checkpointing_interval", "2", "--offload_activations",
            "--compile_cache_dir", folder), env=env)
        summaries.append(json.loads((tmp_path / run / "train_summary.json").read_text()))
        if run == "first":
            saved = sorted(folder.glob("*.torchcompile"))
            (folder / "damaged.torchcompile").write_bytes(b"not a cache file")
    # The plain run's first loss, without waiting for that run (the slowest test's critical path: ~100 s less).
    assert summaries[0]["first_loss"] == pytest.approx(GOLDEN_LOSSES[0], rel=2e-4)
    assert summaries[1]["first_loss"] == pytest.approx(summaries[0]["first_loss"], rel=1e-6)
    assert len(saved) == 1
    # With empty local caches every graph was still found (cold, a run finds at most a graph it compiled twice).
    assert summaries[1]["compile_cache_hits"] >= summaries[1]["graphs_compiled"] > 0
    assert summaries[0]["compile_cache_bypasses"] == summaries[1]["compile_cache_bypasses"] == 0
    assert "Loaded 1 compile cache file(s)" in result.stderr
    assert "Skipping compile cache file" in result.stderr and "damaged.torchcompile" in result.stderr
    assert sorted(folder.glob("*.torchcompile")) == sorted([*saved, folder / "damaged.torchcompile"])  # same graphs
    for summary in summaries:
        moments = summary["seconds_since_launch"]
        order = ["main_started", "images_indexed", "vae_loaded", "data_loaded", "model_loaded", "first_step"]
        assert list(moments) == order and 0 < moments["main_started"]
        assert [moments[m] for m in order] == sorted(moments.values())


@pytest.mark.slow
def test_fp8_training_on_the_nf4_base_trains_like_the_golden_run(tiny_model, tiny_images_master, tiny_embeddings,
                                                                  tmp_path):
    """--do_fp8_training on the NF4 base: the compiled blocks multiply by the NF4 weights on FP8 (the GPU's tensor
    cores, or torch's CPU kernels); the golden run's losses (fp32, eager) come back to within bf16's and FP8's
    rounding."""
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                           tmp_path / "out", *GOLDEN_FLAGS, "--mixed_precision",
                                                           "bf16", "--compile", "--do_fp8_training"),
                        env=CPU_ONLY, check=cpu_fp8_gemm_runs())
    if not cpu_fp8_gemm_runs():  # torch before 2.13 (the GPU machine's 2.11): refused, saying what to install
        assert_one_line_error(result, "--do_fp8_training on the CPU needs", f"this is torch {torch.__version__}")
        return
    fp8_log = [line for line in result.stderr.splitlines() if "multiply on FP8" in line]
    assert len(fp8_log) == 1 and "34 of the 40 NF4 layers" in fp8_log[0]  # the tiny model's 6 others: odd scales
    losses = json.loads((tmp_path / "out" / "train_summary.json").read_text())["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN_LOSSES), rtol=2e-2, atol=0)
    assert all(v.isfinite().all() for v in load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors").values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (runs on the device machine)")
@pytest.mark.parametrize("compile_flags", [[], ["--compile"]])
def test_cuda_graphs_train_exactly_like_eager(compile_flags, tiny_model, tiny_images_master, tiny_embeddings,
                                              tmp_path):
    """The captured micro step (replayed from the third on) gives the eager run's losses and LoRA, with gradient
    accumulation across replays."""
    common = ("--max_train_steps", "5", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
              "--mixed_precision", "bf16", "--logging_steps", "1", *compile_flags)
    for name, flags in [("eager", []), ("graphs", ["--cuda_graphs"])]:
        result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                               tmp_path / name, *common, *flags))
    assert "Captured the training step in a CUDA graph" in result.stderr
    losses = [json.loads((tmp_path / run / "train_summary.json").read_text())["losses"] for run in ("eager", "graphs")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3, atol=1e-5)
    eager = load_file(tmp_path / "eager" / "pytorch_lora_weights.safetensors")
    graphs = load_file(tmp_path / "graphs" / "pytorch_lora_weights.safetensors")
    for key in eager:
        torch.testing.assert_close(graphs[key], eager[key], rtol=1e-3, atol=1e-5)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in graphs.items() if "lora_B" in k)  # it trained


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("compile_flags", [[], ["--compile"]])
def test_cudnn_attention_trains_like_flash(compile_flags, tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    """PyTorch's cuDNN attention gave wrong LoRA gradients (all-zero updates, an illegal memory access at Flux's
    size) until the single blocks' attention gradients were made contiguous (models.py); now its LoRA is flash's."""
    common = ("--max_train_steps", "4", "--learning_rate", "1e-3", "--mixed_precision", "bf16", *compile_flags)
    loras = {}
    for backend in ("_native_flash", "_native_cudnn"):
        run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings,
                                                      tmp_path / backend, *common, "--attention_backend", backend))
        weights = load_file(tmp_path / backend / "pytorch_lora_weights.safetensors")
        loras[backend] = torch.cat([v.flatten().float() for k, v in sorted(weights.items()) if "lora_B" in k])
    flash, cudnn = loras["_native_flash"], loras["_native_cudnn"]
    assert flash.abs().max() > 0  # it trained
    # Adam's first steps move each weight by about +-lr whatever the gradient's size, so the two kernels' bf16
    # rounding flips a few near-zero gradients' steps; another gradient (or none) points elsewhere: cosine ~0.
    assert float(torch.nn.functional.cosine_similarity(cudnn, flash, dim=0)) > 0.9


def test_overwrite_output_dir_starts_over_without_mixing_runs(trained, tiny_model, tiny_images_master,
                                                              tiny_embeddings, tmp_path):
    """Without the flag such a folder is refused (the catalogue above); with it the earlier run's checkpoints and
    LoRA go first, so a later `--resume_from_checkpoint latest` can't pick up the old run."""
    output = tmp_path / "out"
    shutil.copytree(trained, output)
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, output,
                                                           "--max_train_steps", "3", "--checkpointing_steps", "2",
                                                           "--overwrite_output_dir"))
    assert "removed the earlier run's" in result.stderr
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]  # the new run's only
    assert json.loads((output / "train_summary.json").read_text())["steps"] == 3


@pytest.mark.gpu  # the text encoders on the GPU, and its peak memory
def test_validation_prompts_not_in_the_parquet_are_encoded_at_start(tiny_model, tiny_images_master, tiny_embeddings,
                                                                   tmp_path):
    """The text encoders are loaded briefly (on a GPU with room, else the CPU) and freed before the transformer
    loads: the run's peak GPU memory is the same as with the prompt taken from the parquet."""
    peaks = {}
    for name, prompt in [("embedded", VALIDATION), ("new", "a prompt nobody embedded")]:
        result = run_script("train_qlora_flux.py", *train_args(
            tiny_model, tiny_images_master, tiny_embeddings, tmp_path / name, "--max_train_steps", "2",
            "--validation_prompt", prompt, "--validation_inference_steps", "2"))
        summary = json.loads((tmp_path / name / "train_summary.json").read_text())
        assert len(summary["samples_after"]) == 1 and (tmp_path / name / summary["samples_after"][0]).exists()
        peaks[name] = summary["peak_gpu_memory_gib"]
    assert "Encoded 1 validation prompt(s) not in the embeddings file" in result.stderr
    assert peaks["new"] == pytest.approx(peaks["embedded"], rel=0.01)

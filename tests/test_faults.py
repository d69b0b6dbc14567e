"""Every reader and writer of user files against one generated table of faults: each kind of file x each way it can
be wrong (missing, empty, a folder, truncated, not UTF-8, the wrong shape, non-finite values) must be one `error:`
line naming the file, never a traceback; a failed write leaves the earlier file intact. A new reader is covered by
adding one entry to KINDS. Readers run in-process (fast); a few rows run a script end to end."""

from __future__ import annotations

import argparse
import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import CPU_ONLY, GOLDEN_FLAGS, assert_one_line_error, run_script, train_args
from PIL import Image
from safetensors.torch import load_file, save_file

from flux_qlora import checkpoints, cli, data, embeddings, families, files, latent_cache, models
from flux_qlora.convert import convert_file, read_lora_file
from flux_qlora.errors import UserError

LORA_KEY = "transformer.transformer_blocks.0.attn.to_q"


# --- good files of each kind ------------------------------------------------------------------------------------

def _image(path: Path) -> None:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)


def _parquet(path: Path, nan: bool = False, drop: str | None = None, strings: bool = False) -> None:
    prompt = torch.randn(2, 4, 8)
    if nan:
        prompt[1, 2, 3] = float("nan")
    table = embeddings._table(["k0", "k1"], ["a", "b"], prompt, torch.randn(2, 6), torch.zeros(4, 3))
    manifest = embeddings.make_manifest((4, 8), (6,), (4, 3), source={}, family="flux1")
    if drop:
        table = table.drop_columns([drop])
    if strings:
        table = table.set_column(table.schema.get_field_index("prompt_embeds"), "prompt_embeds",
                                 pa.array([["x"]] * 2, pa.list_(pa.string())))
    pq.write_table(table.replace_schema_metadata({embeddings.MANIFEST_KEY: json.dumps(manifest).encode()}), path)


def _lora(path: Path, value: float = 0.1, keys: tuple[str, ...] = (LORA_KEY,)) -> None:
    tensors = {}
    for key in keys:
        tensors[f"{key}.lora_A.weight"] = torch.full((4, 3072), value)
        tensors[f"{key}.lora_B.weight"] = torch.full((3072, 4), value)
    save_file(tensors, str(path))


def _latents(path: Path, value: float = 0.5, names: tuple[str, ...] = ("latents",)) -> None:
    save_file({name: torch.full((16, 4, 4), value) for name in names}, str(path))


def _model(path: Path, index: object = None) -> None:
    """A pipeline folder's files that family detection reads: model_index.json and transformer/config.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "transformer").mkdir(exist_ok=True)
    (path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"} if index is None else index))


# --- the readers, called as the scripts call them ---------------------------------------------------------------

def _read_caption(path: Path):
    _image(path.with_suffix(".png"))
    return data.load_local_samples(str(path.parent), "text", None)


def _read_metadata(path: Path):
    _image(path.parent / "000.png")
    return data.load_local_samples(str(path.parent), "text", None)


def _read_image(path: Path):
    (path.with_suffix(".txt")).write_text("a caption")
    return data.load_local_samples(str(path.parent), "text", None)


def _read_mask(path: Path):
    _image(path.parent / "000.png")
    (path.parent / "000.txt").write_text("a caption")
    samples = data.load_local_samples(str(path.parent), "text", None)
    return samples[0].open_mask()


def _read_prompt_file(path: Path):
    from infer import read_prompts

    return read_prompts(argparse.Namespace(prompt=[], prompt_file=str(path), save_fused=None))


def _read_parquet(path: Path):
    embeddings.rows_and_text_tokens(path)  # the memory plan's read: before the tensors, and checked as strictly
    return embeddings.read_embeddings(path)


def _read_lora_for_infer(path: Path):
    file = read_lora_file(path)
    file.check_finite()
    return file.rank


def _convert_lora(path: Path):
    return convert_file(path, path.with_name("out.safetensors"), "comfyui")


def _read_cached_latents(path: Path):
    return latent_cache.LatentFiles([path], "latents")[torch.tensor([0])]


def _reuse_cached_latents(path: Path):
    """A cache entry found at start: reusable or not (then encoded again); never an error, never trained on."""
    cache = latent_cache.LatentCache(path.parent, {}, torch.float32)
    if cache.reusable(path, ["latents"]):
        return None
    raise UserError(f"{path} not reusable: encoded again")  # what the table expects of a bad entry


def _read_latent_manifest(path: Path):
    return latent_cache.LatentCache(path.parent, {}, torch.float32)


def _read_training_state(path: Path):
    return checkpoints.read_training_state(path.parent)


def _read_model_index(path: Path):
    return families.detect_pipeline(str(path.parent))


def _read_transformer_config(path: Path):
    return models.read_transformer_config(str(path.parent.parent))


def _read_config(path: Path):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate", type=float)
    return cli.read_config(str(path), parser)


# --- the faults ---------------------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


NOT_UTF8 = "caf\xe9 latin-1".encode("latin-1")
GENERIC_FAULTS: dict[str, Callable[[Path, Callable[[Path], None]], None]] = {
    "missing": lambda path, good: None,
    "empty": lambda path, good: path.write_bytes(b""),
    "folder": lambda path, good: path.mkdir(),
    "truncated": lambda path, good: (good(path), _truncate(path)),
    "not_utf8": lambda path, good: path.write_bytes(NOT_UTF8),
}


@dataclass
class Kind:
    """One kind of user file: its name in the folder a test makes, a good one, the reader, which generic faults
    apply (some are no fault: an empty caption falls back to --instance_prompt) and the kind's own faults."""

    name: str
    good: Callable[[Path], None]
    read: Callable[[Path], object]
    generic: tuple[str, ...] = tuple(GENERIC_FAULTS)
    own: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    named: str | None = None  # what the message names, if not the file's name (a missing caption: its image)


KINDS = [
    Kind("000.txt", lambda p: p.write_text("a caption"), _read_caption, ("folder", "not_utf8"), named=None),
    Kind("metadata.jsonl", lambda p: p.write_text('{"file_name": "000.png", "text": "a caption"}\n'), _read_metadata,
         ("folder", "truncated", "not_utf8"),
         {"a_list": lambda p: p.write_text('["000.png", "a caption"]\n'),
          "no_file_name": lambda p: p.write_text('{"text": "a caption"}\n'),
          "no_caption_column": lambda p: p.write_text('{"file_name": "000.png", "caption": "x"}\n')}),
    Kind("000.png", _image, _read_image, ("empty", "folder", "truncated", "not_utf8")),
    Kind("000_mask.png", lambda p: Image.new("L", (32, 32), 255).save(p), _read_mask,
         ("empty", "folder", "truncated", "not_utf8")),
    Kind("prompts.txt", lambda p: p.write_text("a prompt\n"), _read_prompt_file, ("missing", "folder", "not_utf8")),
    Kind("embeddings.parquet", _parquet, _read_parquet, ("missing", "empty", "folder", "truncated", "not_utf8"),
         {"no_prompt_embeds": lambda p: _parquet(p, drop="prompt_embeds"),
          "no_text_ids": lambda p: _parquet(p, drop="text_ids"),
          "strings_for_floats": lambda p: _parquet(p, strings=True),
          "nan": lambda p: _parquet(p, nan=True)}),
    Kind("lora.safetensors", _lora, _read_lora_for_infer, ("missing", "empty", "folder", "truncated", "not_utf8"),
         {"nan": lambda p: _lora(p, float("nan"))}),
    Kind("convert.safetensors", _lora, _convert_lora, ("missing", "empty", "folder", "truncated", "not_utf8"),
         {"no_lora_keys": lambda p: save_file({"model.weight": torch.ones(2)}, str(p))}),
    Kind("ab.safetensors", _latents, _read_cached_latents, ("missing", "empty", "folder", "truncated", "not_utf8"),
         {"nan": lambda p: _latents(p, float("nan")), "inf": lambda p: _latents(p, float("inf")),
          "no_latents": lambda p: _latents(p, names=("mask",))}),
    Kind("cd.safetensors", _latents, _reuse_cached_latents, ("empty", "truncated", "not_utf8"),
         {"nan": lambda p: _latents(p, float("nan")), "no_latents": lambda p: _latents(p, names=("mask",))}),
    Kind("manifest.json", lambda p: p.write_text('{"layout_version": 1}'), _read_latent_manifest,
         ("empty", "folder", "truncated", "not_utf8"), {"a_list": lambda p: p.write_text("[1]")}),
    Kind("training_state.json", lambda p: p.write_text('{"global_step": 4}'), _read_training_state,
         tuple(GENERIC_FAULTS), {"a_list": lambda p: p.write_text("[4]"),
                                 "no_global_step": lambda p: p.write_text('{"losses": []}')}),
    Kind("model/model_index.json", lambda p: _model(p.parent), _read_model_index, tuple(GENERIC_FAULTS),
         {"a_list": lambda p: _model(p.parent, ["FluxPipeline"]),
          "another_pipeline": lambda p: _model(p.parent, {"_class_name": "StableDiffusionXLPipeline"})}),
    Kind("model/transformer/config.json", lambda p: _model(p.parent.parent), _read_transformer_config,
         tuple(GENERIC_FAULTS), {"a_list": lambda p: p.write_text("[]"),
                                 "another_transformer": lambda p: p.write_text('{"_class_name": "UNet2DModel"}')}),
    Kind("run.toml", lambda p: p.write_text("learning_rate = 1e-4\n"), _read_config,
         ("missing", "folder", "truncated", "not_utf8"), {"unknown_key": lambda p: p.write_text("learnig_rate = 1\n")}),
]


def _prepare(kind: Kind, fault: str, tmp_path: Path) -> Path:
    path = tmp_path / kind.name
    path.parent.mkdir(parents=True, exist_ok=True)
    if "/" in kind.name:  # a file inside a model folder: the rest of the folder is good
        kind.good(path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if fault in kind.own:
        kind.own[fault](path)
    else:
        GENERIC_FAULTS[fault](path, kind.good)
    return path


ROWS = [pytest.param(kind, fault, id=f"{kind.name.split('/')[-1]}-{fault}")
        for kind in KINDS for fault in (*kind.generic, *kind.own)]


@pytest.mark.parametrize("kind", [pytest.param(kind, id=kind.name.split("/")[-1]) for kind in KINDS])
def test_each_reader_reads_its_good_file(kind, tmp_path):
    path = _prepare(kind, "missing", tmp_path)
    kind.good(path)
    kind.read(path)


@pytest.mark.parametrize(("kind", "fault"), ROWS)
def test_every_fault_of_every_file_is_one_line_naming_it(kind, fault, tmp_path):
    path = _prepare(kind, fault, tmp_path)
    with pytest.raises(UserError) as error:
        kind.read(path)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message, message
    model_folder = str(tmp_path / "model") if kind.name.startswith("model/") else None  # may name the model
    assert (kind.named or path.name) in message or (model_folder and model_folder in message), message
    assert len(message) < 600, message


# --- writers ------------------------------------------------------------------------------------------------------

def _fail_with(error: BaseException) -> Callable[[Path], None]:
    def write(partial: Path) -> None:
        partial.write_bytes(b"half of the new file")
        raise error

    return write


def _safetensors_error(message: str) -> BaseException:
    from safetensors import SafetensorError

    return SafetensorError(message)


WRITE_FAULTS = {  # what each library raises when the disk is full or the folder read-only (root ignores chmod)
    "no_space": _fail_with(OSError(errno.ENOSPC, "No space left on device")),
    "read_only": _fail_with(PermissionError(errno.EACCES, "Permission denied")),
    "safetensors_no_space": _fail_with(_safetensors_error(
        "Error while serializing: I/O error: No space left on device (os error 28)")),
    "torch_save": _fail_with(RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with "
                                          "strerror: Read-only file system")),
    "pyarrow_no_space": _fail_with(pa.lib.ArrowIOError(errno.ENOSPC, "No space left on device")),
}


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_every_failed_atomic_write_is_one_line_and_keeps_the_earlier_file(fault, tmp_path):
    """What the LoRA, the parquet, the cached latents, a converted LoRA and the compile cache are written through."""
    target = tmp_path / "pytorch_lora_weights.safetensors"
    target.write_bytes(b"the earlier file")
    with pytest.raises(UserError) as error, files.written_atomically(target) as partial:
        WRITE_FAULTS[fault](partial)
    assert str(target) in str(error.value) and "left as it was" in str(error.value)
    assert target.read_bytes() == b"the earlier file" and list(tmp_path.iterdir()) == [target]


def test_a_bug_in_a_writer_keeps_its_traceback(tmp_path):
    with pytest.raises(TypeError), files.written_atomically(tmp_path / "x") as partial:
        partial.write_bytes(b"x")
        raise TypeError("a bug, not the disk")


WRITERS = {  # each real writer, with a folder standing where its file goes
    "latents": lambda path: latent_cache.LatentCache.write(path, {"latents": torch.ones(2)}),
    "parquet": lambda path: embeddings._write_atomically(pa.table({"a": [1]}), path),
    "converted_lora": lambda path: (_lora(path.with_name("in.safetensors")),
                                    convert_file(path.with_name("in.safetensors"), path, "comfyui")),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_folder_in_the_way_of_a_writer_is_one_line(writer, tmp_path):
    (tmp_path / "ab").mkdir()
    path = tmp_path / "ab" / "file.safetensors"
    path.mkdir()
    (path / "keep").write_text("the folder's content")
    with pytest.raises(UserError) as error:
        WRITERS[writer](path)
    assert str(path) in str(error.value) and "folder stands where a file is needed" in str(error.value)
    assert (path / "keep").read_text() == "the folder's content"


class _FailingAccelerator:
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, folder: str):
        Path(folder).mkdir()
        (Path(folder) / "optimizer.bin").write_bytes(b"half")
        raise _safetensors_error("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_earlier_ones(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / checkpoints.STATE_FILE).write_text('{"global_step": 2}')
    with pytest.raises(UserError) as error:
        checkpoints.save_checkpoint(_FailingAccelerator(), tmp_path, 4, {}, total_limit=1)
    assert "checkpoint" in str(error.value) and "No space left" in str(error.value)
    assert "free some space" in str(error.value) and "earlier checkpoints are left" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no half-written folder


# --- flags that name hardware this machine hasn't got -----------------------------------------------------------

def _no_gpu() -> bool:
    return not torch.cuda.is_available()


def _no_fp8() -> bool:
    return _no_gpu() or torch.cuda.get_device_capability() < (8, 9)


MISSING_GPU = f"cuda:{torch.cuda.device_count()}"  # one past the last: missing on every machine
HARDWARE_FLAGS = [  # (script, flags, absent on this machine, fragments of the one line)
    ("infer.py", ["--device", MISSING_GPU], lambda: True, ["--device", MISSING_GPU]),
    ("infer.py", ["--device", "cuda"], _no_gpu, ["--device cuda", "no CUDA GPU"]),
    ("infer.py", ["--device", "tpu"], lambda: True, ["--device tpu"]),
    ("infer.py", ["--fp8"], _no_fp8, ["--fp8", "8.9"]),
    ("infer.py", ["--cuda_graphs"], _no_gpu, ["--cuda_graphs"]),
    ("infer.py", ["--quantize_text_encoder", "nf4"], _no_gpu, ["--quantize_text_encoder", "CUDA"]),
    ("compute_embeddings.py", ["--device", MISSING_GPU], lambda: True, ["--device", MISSING_GPU]),
    ("compute_embeddings.py", ["--device", "cuda"], _no_gpu, ["--device cuda", "no CUDA GPU"]),
    ("train_qlora_flux.py", ["--cuda_graphs"], _no_gpu, ["--cuda_graphs", "NVIDIA GPU"]),
    ("train_qlora_flux.py", ["--do_fp8_training", "--base_precision", "bf16"], _no_fp8,
     ["--do_fp8_training", "8.9"]),
]


def _in_process(script: str, flags: list[str], tiny_model: Path, tmp_path: Path) -> None:
    if script == "infer.py":
        import infer

        args = infer.parse_args(["--pretrained_model_name_or_path", str(tiny_model), "--prompt", "x", *flags])
        infer.validate_args(args)
        infer.pick_device(args)
    else:
        import compute_embeddings

        compute_embeddings.validate_args(compute_embeddings.parse_args(
            ["--instance_data_dir", str(tmp_path), "--output_path", str(tmp_path / "e.parquet"), *flags]))


@pytest.mark.parametrize(("script", "flags", "absent", "fragments"),
                         [pytest.param(*row, id=f"{row[0].removesuffix('.py')}{''.join(row[1])}")
                          for row in HARDWARE_FLAGS])
def test_every_flag_naming_hardware_this_machine_lacks_is_one_line(script, flags, absent, fragments, tiny_model,
                                                                    tiny_images_master, tiny_embeddings, tmp_path):
    if not absent():
        pytest.skip("this machine has that hardware")
    if script == "train_qlora_flux.py":  # its checks need the accelerator: the script, stopped before any load
        result = run_script(script, *train_args(tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "out",
                                                "--dry_run", *flags), env=CPU_ONLY, check=False)
        assert_one_line_error(result, *fragments)
        return
    with pytest.raises(UserError) as error:
        _in_process(script, flags, tiny_model, tmp_path)
    assert "\n" not in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


# --- a few rows end to end: the scripts print the one line ------------------------------------------------------

def test_scripts_print_one_line_for_files_that_are_not_utf8(tiny_model, tiny_images, tiny_embeddings, tmp_path):
    (tiny_images / "001.txt").write_bytes(NOT_UTF8)
    result = run_script("compute_embeddings.py", "--pretrained_model_name_or_path", tiny_model, "--instance_data_dir",
                        tiny_images, "--output_path", tmp_path / "e.parquet", check=False)
    assert_one_line_error(result, "001.txt", "not UTF-8", "as UTF-8")
    result = run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images, tiny_embeddings,
                                                           tmp_path / "out"), check=False)
    assert_one_line_error(result, "001.txt", "not UTF-8")
    (tmp_path / "prompts.txt").write_bytes(NOT_UTF8)
    result = run_script("infer.py", "--pretrained_model_name_or_path", tiny_model, "--prompt_file",
                        tmp_path / "prompts.txt", check=False)
    assert_one_line_error(result, "--prompt_file", "prompts.txt", "not UTF-8")


def test_the_converter_refuses_a_file_that_is_not_a_flux_lora(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.weight": torch.ones(2)}, str(tmp_path / "sdxl.safetensors"))
    result = run_script("-m", "flux_qlora.convert", tmp_path / "sdxl.safetensors", tmp_path / "out.safetensors",
                        "--to", "comfyui", check=False)
    assert_one_line_error(result, "sdxl.safetensors", "not a Flux LoRA")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_model_folder_without_model_index_is_one_line(tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model", ignore=shutil.ignore_patterns("*.safetensors")))
    (model / "model_index.json").unlink()
    result = run_script("infer.py", "--pretrained_model_name_or_path", model, "--prompt", "x", check=False)
    assert_one_line_error(result, str(model), "no model_index.json", "whole Flux pipeline")


def test_bad_cached_latents_are_encoded_again_not_trained_on(tiny_model, tiny_images_master, tiny_embeddings,
                                                             tmp_path):
    """A NaN entry (today: a NaN loss blamed on the learning rate) and a truncated one (a traceback mid-training)
    found in --cache_latents_dir are logged and encoded again."""
    cache = tmp_path / "latents"

    def train(output: str) -> str:
        return run_script("train_qlora_flux.py", *train_args(
            tiny_model, tiny_images_master, tiny_embeddings, tmp_path / output, *GOLDEN_FLAGS, "--max_train_steps",
            "1", "--cache_latents_dir", cache), env=CPU_ONLY).stderr

    assert "6 encoded, 0 reused" in train("first")
    entries = sorted(cache.rglob("*.safetensors"))
    save_file({name: torch.full_like(t, float("nan")) for name, t in load_file(entries[0]).items()}, str(entries[0]))
    _truncate(entries[1])
    log = train("second")
    assert "2 encoded, 4 reused" in log and log.count("encoding it again") == 2
    assert all(bool(torch.isfinite(t).all()) for entry in entries for t in load_file(entry).values())


def test_nan_in_the_embeddings_file_is_that_files_fault(tmp_path):
    _parquet(tmp_path / "e.parquet", nan=True)
    with pytest.raises(UserError, match=r"e\.parquet.*NaN/inf.*re-run compute_embeddings"):
        embeddings.read_embeddings(tmp_path / "e.parquet")
    assert np.isnan(pq.read_table(tmp_path / "e.parquet")["prompt_embeds"].combine_chunks().flatten()
                    .to_numpy()).any()


def test_the_trainer_takes_a_model_folder_without_model_index(tiny_model, tiny_images, tiny_embeddings, tmp_path):
    """The trainer reads only transformer/, vae/ and scheduler/ (the benchmarks' random models have no
    model_index.json): its family comes from the transformer's config, and --dry_run gets to the memory plan."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (model / "model_index.json").unlink()
    result = run_script("train_qlora_flux.py", *train_args(model, tiny_images, tiny_embeddings, tmp_path / "out"),
                        "--dry_run")
    assert "Memory plan: GPU peak" in result.stdout


def test_an_unreadable_training_config_beside_a_lora_is_warned_about_not_fatal(tmp_path, caplog):
    """The LoRA may still be good: it is read without its record, and the log says which checks that skips."""
    from flux_qlora.run_config import config_beside

    lora_file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, lora_file)
    (tmp_path / "training_config.toml").write_bytes(b"rank = \xff\xfe")
    with caplog.at_level("WARNING"):
        assert config_beside(lora_file) is None
    assert "training_config.toml is not readable" in caplog.text and "go unchecked" in caplog.text

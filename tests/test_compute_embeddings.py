from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_one_line_error, assert_refused, run_script
from PIL import Image

from compute_embeddings import parse_args, validate_args
from flux_qlora.data import image_hash
from flux_qlora.embeddings import EmbeddingsWriter, prompt_key, read_embeddings

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compute_embeddings.py's without --device


def _direct_embeddings(model_dir, captions, max_sequence_length, device: str = DEFAULT_DEVICE):
    """The encoders' own output, on `device` in the dtype compute_embeddings.py uses there (bf16 on a GPU)."""
    from diffusers import FluxPipeline

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = FluxPipeline.from_pretrained(model_dir, transformer=None, vae=None, dtype=dtype).to(device)
    with torch.no_grad():
        return [t.cpu() for t in pipe.encode_prompt(captions, max_sequence_length=max_sequence_length)]


def test_embeddings_match_images_and_encoders(tiny_model, tiny_images_master, tiny_embeddings):
    table = read_embeddings(tiny_embeddings)
    images = sorted(tiny_images_master.glob("*.png"))
    validation = "a red circle on a green background"
    assert len(table.keys) == len(images) + 2  # and the validation prompt and the empty caption
    assert table.prompt_embeds.shape == (len(images) + 2, 16, 32)
    assert table.pooled_prompt_embeds.shape == (len(images) + 2, 32)
    assert table.text_ids.shape == (16, 3)
    index = table.index()
    captions = [p.with_suffix(".txt").read_text() for p in images]
    rows = [index[image_hash(Image.open(p))] for p in images]
    assert [table.captions[i] for i in rows] == captions
    prompt_embeds, pooled, _ = _direct_embeddings(tiny_model, captions + [validation], 16, device="cpu")  # conftest
    torch.testing.assert_close(table.prompt_embeds[rows], prompt_embeds[:-1])
    torch.testing.assert_close(table.pooled_prompt_embeds[rows], pooled[:-1])
    stored_prompt, stored_pooled = table.prompt(validation)
    torch.testing.assert_close(stored_prompt, prompt_embeds[-1:])
    torch.testing.assert_close(stored_pooled, pooled[-1:])
    assert table.manifest["source"]["max_sequence_length"] == 16


def test_reads_diffusers_research_layout(tmp_path):
    # As diffusers' research-project compute_embeddings.py writes it: flattened float lists, no manifest.
    rng = np.random.default_rng(0)
    prompt_embeds, pooled = rng.standard_normal((3, 7, 24)), rng.standard_normal((3, 12))
    df = pd.DataFrame({
        "image_hash": ["a", "b", "c"],
        "prompt_embeds": [p.flatten().tolist() for p in prompt_embeds],
        "pooled_prompt_embeds": [p.tolist() for p in pooled],
        "text_ids": [np.zeros((7, 3)).flatten().tolist()] * 3,
    })
    df.to_parquet(tmp_path / "research.parquet")
    table = read_embeddings(tmp_path / "research.parquet")
    assert table.keys == ["a", "b", "c"]
    assert table.prompt_embeds.shape == (3, 7, 24) and table.text_ids.shape == (7, 3)
    np.testing.assert_allclose(table.prompt_embeds.numpy(), prompt_embeds, rtol=1e-6)
    np.testing.assert_allclose(table.pooled_prompt_embeds.numpy(), pooled, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.gpu  # the default device: bf16 on a GPU
def test_rerun_encodes_only_changed_captions_and_drops_removed_images(tiny_model, tiny_images, tmp_path):
    output = tmp_path / "emb.parquet"
    common = ["--pretrained_model_name_or_path", tiny_model, "--instance_data_dir", tiny_images,
              "--output_path", output, "--max_sequence_length", "8"]
    run_script("compute_embeddings.py", *common)
    images = sorted(tiny_images.glob("*.png"))
    images[0].with_suffix(".txt").write_text("a new caption")
    images[1].unlink()
    result = run_script("compute_embeddings.py", *common)
    assert "1 captions to encode" in result.stderr
    table = read_embeddings(output)
    assert len(table.keys) == len(images) - 1 + 1  # one image fewer, and the empty caption
    row = table.index()[image_hash(Image.open(images[0]))]
    assert table.captions[row] == "a new caption"
    prompt_embeds, _, _ = _direct_embeddings(tiny_model, ["a new caption"], 8)
    torch.testing.assert_close(table.prompt_embeds[row : row + 1].to(prompt_embeds.dtype), prompt_embeds)


def test_interrupted_run_resumes_from_parts(tmp_path):
    source = {"pretrained_model_name_or_path": "m", "revision": None, "max_sequence_length": 4}
    output = tmp_path / "emb.parquet"
    first = EmbeddingsWriter(output, source, rows_per_part=1)
    first.write(["k1"], ["one"], torch.ones(1, 4, 8), torch.ones(1, 5), torch.zeros(4, 3))
    # ...the process dies here: the part is on disk, the output is not.
    assert not output.exists()
    second = EmbeddingsWriter(output, source)
    assert second.done_rows() == {"k1": "one"}
    second.write(["k2"], ["two"], 2 * torch.ones(1, 4, 8), torch.ones(1, 5), torch.zeros(4, 3))
    assert second.finish(["k1", "k2"]) == 2
    table = read_embeddings(output)
    assert table.keys == ["k1", "k2"] and table.prompt_embeds[1].eq(2).all()
    assert not second.parts_dir.exists()


def test_duplicate_images_are_reported_and_embedded_once(tiny_model, tiny_images, tmp_path):
    shutil.copy(tiny_images / "000.png", tiny_images / "copy.png")
    shutil.copy(tiny_images / "000.txt", tiny_images / "copy.txt")
    output = tmp_path / "emb.parquet"
    result = run_script("compute_embeddings.py", "--pretrained_model_name_or_path", tiny_model,
                        "--instance_data_dir", tiny_images, "--output_path", output, "--max_sequence_length", "8")
    assert "1 duplicate image(s) skipped" in result.stderr and "copy.png" in result.stderr
    assert len(read_embeddings(output).keys) == 6 + 1  # the empty caption's row too


def test_metadata_jsonl_and_instance_prompt_captions(tiny_images):
    from flux_qlora.data import load_local_samples

    (tiny_images / "000.txt").unlink()
    assert load_local_samples(str(tiny_images), "text", "sks style")[0].caption == "sks style"
    (tiny_images / "metadata.jsonl").write_text('{"file_name": "000.png", "text": "from jsonl"}\n')
    assert load_local_samples(str(tiny_images), "text", None)[0].caption == "from jsonl"


def _remove_a_caption(images: Path, tmp_path: Path) -> None:
    (images / "002.txt").unlink()


def _add_an_unreadable_image(images: Path, tmp_path: Path) -> None:
    (images / "bad.png").write_bytes(b"not a png")
    (images / "bad.txt").write_text("a caption")


@pytest.mark.parametrize("data, flags, expect, setup", [
    pytest.param("{tmp}/nope", [], ["is not a folder"], None, id="missing_folder"),
    pytest.param("{tmp}", [], ["holds no images"], None, id="no_images"),
    pytest.param(None, [], ["002.png", "--instance_prompt"], _remove_a_caption, id="no_caption"),
    pytest.param(None, [], ["bad.png", "unreadable"], _add_an_unreadable_image, id="unreadable"),
    pytest.param(None, ["--t5_8bit", "--device", "cpu"], ["--t5_8bit", "CUDA"], None, id="t5_8bit_on_cpu"),
    pytest.param(None, ["--class_data_dir", "{tmp}/nope"], ["--class_data_dir", "is not a folder"], None,
                 id="missing_class_dir"),
    pytest.param(None, ["--eval_data_dir", "{tmp}/nope"], ["--eval_data_dir", "is not a folder"], None,
                 id="missing_eval_dir"),
    # A flag-only mistake (the others: test_flag_mistakes_are_refused_before_anything_loads): the script runs
    # validate_args first, and its refusal is one `error:` line, exit code 2, no traceback.
    pytest.param(None, ["--max_sequence_length", "0"], ["--max_sequence_length 0"], None, id="zero_length"),
])
def test_bad_input_gives_one_clear_line(data, flags, expect, setup, tiny_model, tiny_images, tmp_path):
    if setup:
        setup(tiny_images, tmp_path)
    data = tiny_images if data is None else data.format(tmp=tmp_path)
    flags = [f.format(tmp=tmp_path) for f in flags]
    result = run_script("compute_embeddings.py", "--pretrained_model_name_or_path", tiny_model,
                        "--instance_data_dir", data, "--output_path", tmp_path / "out.parquet", *flags, check=False)
    assert_one_line_error(result, *expect)
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("flags, expect", [
    pytest.param(["--dataset_name", "someone/data"], ["exactly one of --dataset_name", "--instance_data_dir"],
                 id="two_sources"),
    pytest.param(["--batch_size", "0"], ["--batch_size 0", "at least 1"], id="zero_batch"),
    pytest.param(["--max_sequence_length", "600"], ["--max_sequence_length 600", "512"], id="too_long"),
    pytest.param(["--output_path", "/proc/flux-qlora/out.parquet"], ["--output_path", "does not exist"],
                 id="output_folder_missing"),
])
def test_flag_mistakes_are_refused_before_anything_loads(flags, expect, tiny_model, tiny_images_master, tmp_path):
    """validate_args in-process (the subprocess table's `zero_length` case: how such a refusal reaches the user)."""
    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(tiny_images_master),
            "--output_path", str(tmp_path / "out.parquet"), *flags]
    assert_refused(lambda: validate_args(parse_args(argv)), *expect)


def test_parse_args_defaults():
    args = parse_args(["--instance_data_dir", "x"])
    assert args.max_sequence_length is None and args.output_path == "embeddings.parquet"  # the family's: FLUX.1 77
    assert args.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    assert prompt_key("a") != prompt_key("b")


def test_dataset_name_path_reads_a_datasets_folder_with_the_same_keys(tiny_model, tiny_images, tmp_path):
    """--dataset_name through `datasets.load_dataset` (a local imagefolder here; a Hub id for users)."""
    import json

    pytest.importorskip("datasets", reason="--dataset_name needs the datasets library (not on the GPU machine)")

    lines = [json.dumps({"file_name": p.name, "text": p.with_suffix(".txt").read_text()})
             for p in sorted(tiny_images.glob("*.png"))]
    (tiny_images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    for txt in tiny_images.glob("*.txt"):
        txt.unlink()
    hub, local = tmp_path / "hub.parquet", tmp_path / "local.parquet"
    common = ["--pretrained_model_name_or_path", tiny_model, "--max_sequence_length", "8"]
    run_script("compute_embeddings.py", *common, "--dataset_name", tiny_images, "--output_path", hub,
               "--cache_dir", tmp_path / "cache")
    run_script("compute_embeddings.py", *common, "--instance_data_dir", tiny_images, "--output_path", local)
    from_hub, from_folder = read_embeddings(hub), read_embeddings(local)
    assert sorted(from_hub.keys) == sorted(from_folder.keys) and len(from_hub.keys) == 6 + 1
    torch.testing.assert_close(from_hub.prompt_embeds[[from_hub.index()[k] for k in from_folder.keys]],
                               from_folder.prompt_embeds)


def test_a_damaged_earlier_output_is_rebuilt_not_refused(tiny_model, tiny_images, tmp_path):
    output = tmp_path / "emb.parquet"
    output.write_bytes(b"PAR1 but truncated")
    result = run_script("compute_embeddings.py", "--pretrained_model_name_or_path", tiny_model,
                        "--instance_data_dir", tiny_images, "--output_path", output, "--max_sequence_length", "8")
    assert "not a readable parquet file" in result.stderr and "rebuilt" in result.stderr
    assert len(read_embeddings(output).keys) == 6 + 1

"""A --lora is read from disk once: infer.py reads each file into a LoraFile (a kohya file converted on read) and
hands its tensors on to the checks and the LoRA servers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

import infer
from flux_qlora.convert import convert_file
from flux_qlora.lora import add_lora, save_lora

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def saved_loras(tiny_model, tmp_path_factory) -> dict[str, list[Path]]:
    """Two LoRAs (rank 4 and 8, non-zero B) as we save them (diffusers layout, their config in the metadata) and
    in the kohya/ComfyUI layout."""
    from diffusers import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("read-once")
    files: dict[str, list[Path]] = {"ours": [], "kohya": []}
    for name, rank in [("a", 4), ("b", 8)]:
        transformer = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
        torch.manual_seed(rank)
        add_lora(transformer, rank, None, "gaussian", TARGETS)
        for param_name, param in transformer.named_parameters():
            if "lora_B" in param_name:
                torch.nn.init.normal_(param, std=0.05)
        files["ours"].append(save_lora(transformer, root / name))
        files["kohya"].append(convert_file(files["ours"][-1], root / f"{name}-kohya.safetensors", "kohya"))
    return files


@pytest.fixture
def opens(monkeypatch) -> Counter:
    """How often each file is opened by safetensors, by anyone (our package, diffusers): every read of a
    safetensors file, of its tensors or of its header alone, goes through `safe_open`."""
    import safetensors
    import safetensors.torch

    counts: Counter = Counter()

    def counting(open_):
        def counted(filename, *args, **kwargs):
            counts[Path(filename).resolve()] += 1
            return open_(filename, *args, **kwargs)

        return counted

    monkeypatch.setattr(safetensors, "safe_open", counting(safetensors.safe_open))
    monkeypatch.setattr(safetensors.torch, "safe_open", counting(safetensors.torch.safe_open))  # load_file's
    return counts


@pytest.mark.parametrize("layout, flags, expected", [
    pytest.param("ours", ["--hotswap", "fused"], 1, id="ours-hotswap-fused"),
    pytest.param("kohya", [], 1, id="kohya-load"),
    pytest.param("kohya", ["--hotswap"], 1, id="kohya-hotswap-adapter"),
    # diffusers takes a LoRA config (alpha, rsLoRA) only from a file's metadata, so our files are given to
    # load_lora_weights as files: diffusers opens each again, for its tensors and for its header
    pytest.param("ours", ["--hotswap"], 1 + 2, id="ours-hotswap-adapter"),
])
def test_each_lora_file_is_read_once(layout, flags, expected, tiny_model, saved_loras, opens):
    """Two --lora files through infer.py's LoRA handling and every round of their server: each file opened once
    (before: 5 times for ours, twice for a kohya file and 4 times for its converted copy)."""
    from diffusers import FluxPipeline

    files = saved_loras[layout]
    args = infer.parse_args(["--pretrained_model_name_or_path", str(tiny_model), "--dtype", "fp32", *flags,
                             *sum((["--lora", str(file)] for file in files), [])])
    pipe = FluxPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    server = infer.apply_loras(pipe, infer.resolve_loras(args), args, torch.device("cpu"))
    server.start()
    for index in range(len(server.rounds)):
        server.swap(index)
    read = {str(path): count for path, count in opens.items() if Path(tiny_model).resolve() not in path.parents}
    assert read == {str(file.resolve()): expected for file in files}  # no other file: no converted copy either

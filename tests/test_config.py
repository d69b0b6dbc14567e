"""--config FILE (TOML) for every script: flag values from the file, the command line wins; the trainer writes its
effective config, which runs the same training again."""

from __future__ import annotations

import pytest
import torch
from helpers import VALIDATION, assert_one_line_error, run_script, train_args
from safetensors.torch import load_file

import train_qlora_flux

LORA = "pytorch_lora_weights.safetensors"


@pytest.mark.slow
def test_the_written_config_reruns_the_same_training(tiny_model, tiny_images_master, tiny_embeddings, tmp_path):
    run_script("train_qlora_flux.py", *train_args(tiny_model, tiny_images_master, tiny_embeddings, tmp_path / "a",
                                                  "--max_train_steps", "3", "--learning_rate", "1e-3", "--rank", "8",
                                                  "--hub_token", "hf_SECRET_TOKEN", "--validation_prompt", VALIDATION,
                                                  "--validation_inference_steps", "2"))
    config = (tmp_path / "a" / "training_config.toml").read_text()
    assert "max_train_steps = 3" in config and "rank = 8" in config
    assert f'validation_prompt = ["{VALIDATION}"]' in config
    assert "# torch " in config and "# flux-qlora " in config  # versions and commit, as comments
    assert "SECRET" not in config and "hub_token" not in config  # never a secret

    rerun = tmp_path / "b"
    run_script("train_qlora_flux.py", "--config", tmp_path / "a" / "training_config.toml", "--output_dir", rerun)
    first, second = load_file(tmp_path / "a" / LORA), load_file(rerun / LORA)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # The command line wins over the file, whose other values stay.
    shorter = train_qlora_flux.parse_args(["--config", str(tmp_path / "a" / "training_config.toml"), "--output_dir",
                                           str(tmp_path / "c"), "--max_train_steps", "1"])
    assert shorter.max_train_steps == 1 and shorter.output_dir == str(tmp_path / "c") and shorter.rank == 8


def test_a_bad_config_is_one_clear_line(tiny_model, tmp_path):
    (tmp_path / "typo.toml").write_text('learnig_rate = 1e-4\n')
    result = run_script("train_qlora_flux.py", "--config", tmp_path / "typo.toml", check=False)
    assert_one_line_error(result, "--config", "learnig_rate", "flag names without the dashes")
    (tmp_path / "broken.toml").write_text('rank = = 4\n')
    result = run_script("infer.py", "--config", tmp_path / "broken.toml", check=False)
    assert_one_line_error(result, "--config", "not a readable TOML file")


def test_infer_takes_its_flags_from_a_config(tiny_model, tmp_path):
    (tmp_path / "infer.toml").write_text(f'pretrained_model_name_or_path = "{tiny_model}"\nprompt = ["a red circle"]\n'
                                         f'height = 32\nwidth = 32\nnum_inference_steps = 2\n'
                                         f'output_dir = "{tmp_path / "out"}"\n')
    run_script("infer.py", "--config", tmp_path / "infer.toml", "--num_images", "2")
    assert len(list((tmp_path / "out").glob("*.png"))) == 2

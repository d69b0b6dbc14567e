"""--config FILE (TOML) for every script: flag values from the file, the command line wins; the trainer writes its
effective config, which runs the same training again."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import VALIDATION, assert_one_line_error, flag_value, run_script, train_args
from safetensors.torch import load_file

import compute_embeddings
import infer
import train_qlora_flux
from flux_qlora.cli import config_actions
from flux_qlora.run_config import NOT_SAVED, write_config

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


# ---------------------------------------------------------------------------------------------------------------
# Every flag of every script, generated from its parser: a new flag is covered without a new test.
# ---------------------------------------------------------------------------------------------------------------

SCRIPTS = {"train_qlora_flux": train_qlora_flux, "infer": infer, "compute_embeddings": compute_embeddings}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value) if isinstance(value, int | float) else f'"{value}"'


def _many(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")


def good_values(action: argparse.Action) -> list[tuple[object, list[str]]]:
    """(TOML value, the same on the command line) pairs for the flag."""
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return [(not action.default, [flag])]
    if _many(action):
        first, second = flag_value(action), flag_value(action, 1)
        return [([first, second], [flag, str(first), flag, str(second)]), (first, [flag, str(first)])]
    cases = [(flag_value(action), [flag, str(flag_value(action))])]
    if action.nargs == "?":
        cases.append((True, [flag]))  # the flag alone
    return cases


def bad_values(action: argparse.Action) -> list[str]:
    """TOML values the flag refuses, as the file spells them."""
    if action.nargs == 0:
        return ['"no"', '"false"', "1", "[true]"]
    bad = ["{ x = 1 }"] + ([] if action.nargs == "?" else ["true"])
    if action.choices is not None:
        bad.append('"not-a-choice"')
    bad += {int: ["4.7", '"four"'], float: ['"many"']}.get(action.type, [])
    if _many(action):
        bad += [f"[{value}]" for value in bad]
    elif action.choices is None:
        bad.append("[1, 2]")  # a list for a one-value flag
    return bad


def _required(module, but: str) -> list[str]:
    return [token for action in module.build_parser()._actions if action.required and action.dest != but
            for token in (action.option_strings[-1], "x")]


FLAG_CASES = [pytest.param(module, key, id=f"{name}:{key}")
              for name, module in SCRIPTS.items() for key in config_actions(module.build_parser())]


@pytest.mark.parametrize("module, key", FLAG_CASES)
def test_each_flag_in_a_config_file_parses_as_on_the_command_line(module, key, tmp_path, capsys):
    """A well-typed value round-trips to the command line's parse; a wrong-typed one is one `error:` line naming
    the file and the key, exit code 2."""
    action = config_actions(module.build_parser())[key]
    base = _required(module, key)
    config = tmp_path / "flags.toml"
    for value, command_line in good_values(action):
        config.write_text(f"{key} = {_toml(value)}\n")
        from_file = vars(module.parse_args(["--config", str(config), *base]))
        from_command_line = vars(module.parse_args([*command_line, *base]))
        assert from_command_line[key] != action.default, (key, value)  # the case changes something
        assert {**from_file, "config": None} == from_command_line, (key, value)
    for value in bad_values(action):
        config.write_text(f"{key} = {value}\n")
        with pytest.raises(SystemExit) as stop:
            module.parse_args(["--config", str(config), *base])
        lines = capsys.readouterr().err.splitlines()
        assert stop.value.code == 2 and len(lines) == 1, (value, lines)
        assert lines[0].startswith(f"error: --config {config}: {key} = "), (value, lines)


def test_the_written_config_parses_back_to_every_flag(tmp_path):
    """training_config.toml of a run with every flag off its default reads back as that run's flags."""
    parser = train_qlora_flux.build_parser()
    command_line = [token for action in config_actions(parser).values() for token in good_values(action)[0][1]]
    flags = vars(train_qlora_flux.parse_args(command_line))
    write_config(flags, tmp_path / "training_config.toml", {"torch": "2"}, {"model_family": "flux1"})
    again = vars(train_qlora_flux.parse_args(["--config", str(tmp_path / "training_config.toml")]))
    assert {k: v for k, v in again.items() if k not in NOT_SAVED} == \
        {k: v for k, v in flags.items() if k not in NOT_SAVED}


def test_a_repeatable_flag_on_the_command_line_replaces_the_files_list(tmp_path):
    (tmp_path / "c.toml").write_text('validation_prompt = ["from the file"]\ndata_df_path = "e.parquet"\n')
    given = train_qlora_flux.parse_args(["--config", str(tmp_path / "c.toml"), "--validation_prompt", "typed"])
    assert given.validation_prompt == ["typed"]
    assert train_qlora_flux.parse_args(["--config", str(tmp_path / "c.toml")]).validation_prompt == ["from the file"]


def test_a_command_line_mistake_is_one_line_too(capsys):
    with pytest.raises(SystemExit) as stop:
        train_qlora_flux.parse_args(["--data_df_path", "x", "--rank", "4.7"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: argument --rank: invalid int value: '4.7' (see --help).\n"

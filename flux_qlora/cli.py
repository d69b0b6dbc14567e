"""What the entry scripts share: logging, turning bad input into one clear line, the flag groups two or more scripts
take (model, dataset, compile cache, attention backend), reading --config files, and the adapters from those flags
to the library's explicit parameters. The trainer's own flags are in `train_settings.py`.

The library modules never see an `argparse.Namespace`: only the scripts, this module and `train_settings.py` do.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from flux_qlora.errors import Interrupted, UserError


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.DEBUG if debug else logging.INFO)


def run_main(main: Callable, args: argparse.Namespace, memory_fix: str = "") -> None:
    """Runs `main(args)`; a `UserError` becomes one `error: ...` line on stderr and exit code 2, and so does running
    out of GPU memory, with `memory_fix` (the script's flags that use less).

    With `--debug` the full traceback is shown instead. `kill -USR1 <pid>` prints where every thread of the process
    is: how a stalled run (one process of a multi-GPU run waiting for another) shows what it waits for.
    """
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    try:
        main(args)
    except torch.OutOfMemoryError as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: out of GPU memory ({describe_out_of_memory(error)}). {memory_fix}".rstrip(), file=sys.stderr)
        sys.exit(2)
    except (UserError, OSError) as error:
        if getattr(args, "debug", False) or (isinstance(error, OSError) and not _is_file_problem(error)):
            raise
        print(f"error: {error if isinstance(error, UserError) else describe_file_problem(error)}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as stop:
        if getattr(args, "debug", False):
            raise
        # str(): an exception is always true, and a bare KeyboardInterrupt's text is empty
        print(f"stopped: {str(stop) or 'interrupted; nothing saved since the last checkpoint'}", file=sys.stderr)
        sys.exit(130)


def describe_out_of_memory(error: Exception) -> str:
    """torch's paragraph about a failed allocation, as the few words a user needs: how much, of how much."""
    text, size = str(error), r"([\d.]+ (?:bytes|KiB|MiB|GiB|TiB))"
    asked = re.search(rf"Tried to allocate {size}", text)
    allowed = re.search(rf"{size} allowed", text)  # a per-process cap (set_per_process_memory_fraction)
    total = re.search(rf"total capacity of {size} of which {size} is free", text)
    if not asked:
        return text.split(". ")[0].strip()
    if allowed:
        return f"{asked[1]} more needed, {allowed[1]} allowed to this process"
    return f"{asked[1]} more needed" + (f", {total[2]} free of {total[1]}" if total else "")


def _is_file_problem(error: OSError) -> bool:
    from flux_qlora.files import HINTS

    return error.filename is not None or error.errno in HINTS  # pyarrow's carry an errno and no filename


def describe_file_problem(error: OSError) -> str:
    """A file-system error (read-only folder, a file where a folder should be, a full disk) as one line: the class
    of mistake, wherever in the scripts it surfaces."""
    from flux_qlora.files import HINTS

    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}: {HINTS.get(error.errno, 'check the path')}."


def scrub_secret_flags(argv: list[str]) -> None:
    """Replaces the value of --hub_token in `argv` (sys.argv) in place: trackers record the command line (wandb's
    run metadata does) and no token may reach a log, a tracker or a file."""
    for index, arg in enumerate(argv):
        if arg == "--hub_token" and index + 1 < len(argv):
            argv[index + 1] = "***"
        elif arg.startswith("--hub_token="):
            argv[index] = "--hub_token=***"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", type=str, default="black-forest-labs/FLUX.1-dev",
                       help="A Flux pipeline: Hub id or local folder (model_index.json + subfolders).")
    group.add_argument("--revision", type=str, default=None, help="Hub revision (branch, tag or commit).")
    group.add_argument("--variant", type=str, default=None, help="Weight file variant, e.g. fp16.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where Hub downloads are cached.")


def hub_kwargs(args: argparse.Namespace) -> dict:
    """The model flags every `from_pretrained` call takes."""
    return {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}


def add_attention_backend_arg(group, default: str) -> None:
    group.add_argument("--attention_backend", type=str, default=None,
                       help=f"diffusers attention backend, e.g. _native_flash, _native_cudnn, flash, _flash_3 "
                            f"(default: {default}).")


def add_compile_cache_arg(group) -> None:
    group.add_argument("--compile_cache_dir", type=str, default=None,
                       help="With --compile: keep the compiled graphs in this folder (e.g. on Google Drive) and load "
                            "them at start, so a fresh machine skips most of the compilation (BENCHMARKS.md).")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """The dataset flags shared by compute_embeddings.py and train_qlora_flux.py."""
    group = parser.add_argument_group("dataset (a Hub dataset or a local folder)")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="A dataset on the Hub (or a local dataset path `datasets.load_dataset` reads).")
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config, if it has several.")
    group.add_argument("--dataset_split", type=str, default="train", help="The split to use.")
    group.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    group.add_argument("--caption_column", type=str, default="text",
                       help="The dataset column (or metadata.jsonl key) holding the captions.")
    group.add_argument("--instance_data_dir", type=str, default=None,
                       help="A folder of images, captioned by a .txt beside each image or by a metadata.jsonl "
                            "(`file_name` + caption column).")
    group.add_argument("--instance_prompt", type=str, default=None,
                       help="Caption for images that have none (e.g. 'a photo of sks dog').")
    group.add_argument("--class_data_dir", type=str, default=None,
                       help="Regularisation (prior-preservation) images, captioned like --instance_data_dir: "
                            "compute_embeddings.py embeds them with the training images, the trainer mixes a batch "
                            "of them into every step (--prior_loss_weight).")
    group.add_argument("--class_prompt", type=str, default=None,
                       help="Caption for regularisation images that have none (e.g. 'a photo of a dog').")
    group.add_argument("--eval_data_dir", type=str, default=None,
                       help="Held-out images for the trainer's eval loss (never trained on), captioned like "
                            "--instance_data_dir (--instance_prompt for those without): compute_embeddings.py "
                            "embeds them with the training images.")


def check_dataset_args(args: argparse.Namespace) -> None:
    if bool(args.dataset_name) == bool(args.instance_data_dir):
        raise UserError("give exactly one of --dataset_name (a Hub dataset) or --instance_data_dir (a folder).")


def dataset_kwargs(args: argparse.Namespace) -> dict:
    """The dataset flags as `data.load_samples` takes them."""
    return {"dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name,
            "dataset_split": args.dataset_split, "image_column": args.image_column,
            "caption_column": args.caption_column, "instance_data_dir": args.instance_data_dir,
            "instance_prompt": args.instance_prompt, "cache_dir": args.cache_dir}


def check_compile_cache_dir(args: argparse.Namespace) -> None:
    """--compile_cache_dir keeps what --compile compiles: without it there is nothing to keep."""
    if args.compile_cache_dir and not args.compile:
        raise UserError("--compile_cache_dir keeps the graphs that --compile makes: add --compile, or drop the flag.")
    if args.compile_cache_dir and Path(args.compile_cache_dir).exists() and not Path(args.compile_cache_dir).is_dir():
        raise UserError(f"--compile_cache_dir {args.compile_cache_dir} is a file: give a folder.")


def class_samples(args: argparse.Namespace) -> list:
    """The regularisation images of --class_data_dir (none without it)."""
    return _folder_samples(args.class_data_dir, args.caption_column, args.class_prompt, "--class_data_dir",
                           "--class_prompt")


def eval_samples(args: argparse.Namespace, trained: list | None = None) -> list:
    """The held-out images of --eval_data_dir (none without it), refused where one of them is among the `trained`
    samples too."""
    samples = _folder_samples(args.eval_data_dir, args.caption_column, args.instance_prompt, "--eval_data_dir",
                              "--instance_prompt")
    trained_hashes = {s.image_hash for s in trained or []}
    both = [s.source for s in samples if s.image_hash in trained_hashes]
    if both:
        raise UserError(f"{len(both)} image(s) of --eval_data_dir are also training images (e.g. {both[0]}): "
                        "held-out images must not be trained on; remove them from one of the folders.")
    return samples


def _folder_samples(folder: str | None, caption_column: str, fallback: str | None, flag: str,
                    fallback_flag: str) -> list:
    from flux_qlora.data import drop_duplicates, load_local_samples

    if not folder:
        return []
    return drop_duplicates(load_local_samples(folder, caption_column, fallback, flag=flag,
                                              fallback_flag=fallback_flag))


# ---------------------------------------------------------------------------------------------------------------
# --config FILE: flag values from a TOML file (the command line wins); run_config.py writes the trainer's
# ---------------------------------------------------------------------------------------------------------------

def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=str, default=None,
                        help="A TOML file of flag values (e.g. the training_config.toml a run wrote); flags given "
                             "on the command line win.")


def parse_args_with_config(parser: argparse.ArgumentParser, input_args: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, after `--config FILE` (TOML: flag names without the dashes as keys) has set the flags'
    values, each parsed as the command line parses it (`config_value`); flags given on the command line win (a
    repeatable flag given there replaces the file's list). A bad flag, file or key is one `error:` line (exit 2)."""
    parser.error = _parse_error  # argparse's own mistakes (a bad int, a missing flag) as one line too
    first = argparse.ArgumentParser(add_help=False)  # only --config, before the required flags are checked
    first.add_argument("--config", type=str, default=None)
    known, _ = first.parse_known_args(input_args)
    if not known.config:
        return parser.parse_args(input_args)
    try:  # before run_main: the one line is printed here
        values = read_config(known.config, parser)
    except UserError as error:
        _exit_with(str(error))
    replaced = {}  # a repeatable flag's list from the file: argparse would append the command line's to it
    for action in parser._actions:
        if action.dest in values:
            action.required = False  # given by the file
            if isinstance(action, argparse._AppendAction):
                replaced[action.dest] = values.pop(action.dest)
                values[action.dest] = None
    parser.set_defaults(**values)
    args = parser.parse_args(input_args)
    for dest, value in replaced.items():
        if getattr(args, dest) is None:  # not on the command line
            setattr(args, dest, value)
    return args


def config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags a --config file may set, by key (the flag's name without the dashes): all but --help and --config."""
    return {action.dest: action for action in parser._actions
            if action.option_strings and action.dest not in ("help", "config")}


def read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """The flag values of the TOML file `path`, each parsed by its flag's action (`config_value`); an unreadable
    file, an unknown key or a value the flag would refuse is a `UserError` naming the file and the key."""
    from flux_qlora.readers import read_toml

    values = read_toml(path, "--config", "give a TOML file of flag values, e.g. learning_rate = 1e-4")
    values.pop("run", None)  # training_config.toml's record of what the run found (run_config.RUN_TABLE)
    actions = config_actions(parser)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserError(f"--config {path}: unknown key(s) {', '.join(unknown)}; keys are flag names without the "
                        "dashes, e.g. learning_rate = 1e-4.")
    parsed = {}
    for key, value in values.items():
        try:
            parsed[key] = config_value(actions[key], value)
        except ValueError as error:
            raise UserError(f"--config {path}: {key} = {_shown(value)}: {error}.") from None
    return parsed


def config_value(action: argparse.Action, value):
    """A TOML value as the command line would have given `action`'s flag: a switch takes true or false (a TOML
    boolean, not a string such as "no"); a flag with an optional value (`--hotswap`) takes true for the flag alone
    or a value; a repeatable or multi-value flag takes a list or one value for one item; every other value is
    written as on the command line (a TOML number as its digits) and goes through the flag's type and choices, so
    `rank = 4.7` is refused as `--rank 4.7` is. Raises ValueError saying what the flag takes."""
    flag = action.option_strings[-1]
    if action.nargs == 0:  # --random_flip: the key holds the flag's value
        if not isinstance(value, bool):
            raise ValueError(f"{flag} is a switch: write true or false (a TOML boolean, without quotes)")
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction):
            return value
        return action.const if value else action.default
    if action.nargs == "?" and isinstance(value, bool):  # --hotswap alone is `hotswap = true`
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]  # one value: one item
        if action.nargs == "+" and not items:
            raise ValueError(f"{flag} takes at least one value")
        return [_one_value(action, item, flag) for item in items]
    return _one_value(action, value, flag)


def _one_value(action: argparse.Action, value, flag: str):
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{flag} takes {_kind(action)}, e.g. {_example(action)}")
    try:
        result = action.type(str(value)) if action.type else str(value)  # str(1e-4): as typed, "0.0001"
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        if isinstance(error, argparse.ArgumentTypeError):  # the type's own words, with its example
            raise ValueError(f"{flag} {error}") from None
        raise ValueError(f"{flag} takes {_kind(action)}, e.g. {_example(action)}") from None
    if action.choices is not None and result not in action.choices:
        raise ValueError(f"{flag} takes one of {', '.join(map(str, action.choices))}")
    return result


def _kind(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    return {int: "an integer", float: "a number"}.get(action.type, "a string")


def _example(action: argparse.Action) -> str:
    if action.choices is not None:
        return _shown(list(action.choices)[0])
    default = action.default
    if action.type in (int, float) and isinstance(default, int | float) and not isinstance(default, bool):
        return repr(default)
    return {int: "4", float: "0.5"}.get(action.type, '"text"')


def _shown(value) -> str:
    """A TOML value as the file spells it (strings quoted), cut short."""
    import json

    text = json.dumps(value) if isinstance(value, str | bool | list) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_error(message: str) -> None:
    _exit_with(f"{message} (see --help).")


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

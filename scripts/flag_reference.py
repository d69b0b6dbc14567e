"""Writes docs/flags.md, every flag of the three scripts, from their own argparse parsers (`build_parser()`).

    python scripts/flag_reference.py           # rewrite docs/flags.md
    python scripts/flag_reference.py --check   # exit 1 if docs/flags.md differs from what the parsers say

The output depends on the parsers alone (never on the terminal's width or the Python version's group titles), so
tests/test_docs.py can compare the committed file with a fresh rendering.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "flags.md"
SCRIPTS = ("compute_embeddings", "train_qlora_flux", "infer")  # in the order a user runs them
REGENERATE = "python scripts/flag_reference.py"
TYPE_NAMES = {int: "integer", float: "number", str: "text", None: "text"}

HEADER = f"""\
# Flag reference

Every flag of the three scripts, per script and flag group, generated from each script's `build_parser()` by
`{REGENERATE}`: do not edit it by hand (`tests/test_docs.py` fails when it is stale). Any flag can
also come from a `--config` TOML file ([config.md](config.md)); the command line wins. What the flags do together,
by topic: [the docs](README.md).
"""


def value_text(action: argparse.Action) -> str:
    """What the flag takes: a switch, one of its choices, or a value of a type; repeatable or optional values."""
    if action.nargs == 0:
        return "switch"
    if action.choices is not None:
        text = "one of " + ", ".join(f"`{choice}`" for choice in action.choices)
    else:
        text = TYPE_NAMES.get(action.type, getattr(action.type, "__name__", str(action.type)))
    if isinstance(action, argparse._AppendAction):
        text += " (repeatable)"
    if action.nargs == "?":
        text += f" (optional; the flag alone means `{action.const}`)"
    elif action.nargs in ("*", "+"):
        text += " (several)" if action.nargs == "+" else " (any number)"
    return text


def default_text(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0:
        return "on" if action.default else "off"
    if action.default is None or action.default == []:
        return "—"
    return f"`{action.default}`"


def help_text(action: argparse.Action) -> str:
    """The help as argparse would show it (its %-placeholders filled), on one line, safe inside a table cell."""
    text = action.help or ""
    if "%" in text:  # argparse's own expansion: %(default)s, %(choices)s, %% ...
        params = dict(vars(action), prog="")
        if params.get("choices") is not None:
            params["choices"] = ", ".join(str(choice) for choice in params["choices"])
        text = text % params
    text = re.sub(r"\s+", " ", text).strip()
    return text.replace("|", "\\|").replace("<", "&lt;")


def group_table(actions: list[argparse.Action]) -> list[str]:
    lines = ["| flag | value | default | what it does |", "|---|---|---|---|"]
    for action in actions:
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.dest}`"
        lines.append(f"| {flags} | {value_text(action)} | {default_text(action)} | {help_text(action)} |")
    return lines


def script_section(script: str, parser: argparse.ArgumentParser) -> list[str]:
    lines = [f"## {script}.py", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS and a.dest != "help"]
        if not actions:
            continue
        # The untitled group's name changed between Python versions ("optional arguments" -> "options").
        title = "general" if group is parser._optionals else group.title
        lines += [f"### {title}", ""]
        if group.description:
            lines += [re.sub(r"\s+", " ", group.description).strip(), ""]
        lines += [*group_table(actions), ""]
    return lines


def render() -> str:
    """The whole reference, from the scripts' parsers as they are now."""
    lines = [HEADER]
    lines += [f"- [{script}.py](#{script}py)" for script in SCRIPTS] + [""]
    for script in SCRIPTS:
        lines += script_section(script, importlib.import_module(script).build_parser())
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Exit 1 if the file is stale instead of writing it.")
    args = parser.parse_args(argv)
    text = render()
    relative = OUTPUT.relative_to(ROOT)
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{relative} is stale: run `{REGENERATE}` and commit it", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

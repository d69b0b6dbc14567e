"""The docs match the code: the package map names every module, every relative link resolves, and the generated
flag reference is what the scripts' parsers say now."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Switches the package no longer reads: a default now, a flag, removed, or bench/nf4_gemm.py's alone.
RETIRED_VARIABLES = ("FLUX_QLORA_NF4_GEMM", "FLUX_QLORA_NF4_GEMV", "FLUX_QLORA_CHECKPOINT_CSE",
                     "FLUX_QLORA_NF4_DEQUANT")


def section(text: str, heading: str) -> str:
    """The text under a `## heading`, up to the next heading of that level."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def prose(text: str) -> str:
    """Markdown without its fenced code blocks and inline code, where brackets are code, not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(markdown: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", markdown.read_text(), flags=re.S | re.M),
                              flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def load_flag_reference() -> ModuleType:
    """scripts/ is no package: load the generator from its file, as `python scripts/flag_reference.py` runs it."""
    spec = importlib.util.spec_from_file_location("flag_reference", ROOT / "scripts" / "flag_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_map_names_every_module_and_only_modules_that_exist():
    package_map = section((ROOT / "docs" / "architecture.md").read_text(), "The package map")
    mapped = set(re.findall(r"^\| `([\w/]+)\.py` \|", package_map, flags=re.M))
    package = ROOT / "flux_qlora"
    modules = {str(path.relative_to(package).with_suffix("")) for path in package.rglob("*.py")
               if path != package / "__init__.py"}
    assert not modules - mapped, f"modules missing from docs/architecture.md's package map: {sorted(modules - mapped)}"
    assert not mapped - modules, f"docs/architecture.md's package map names no such module: {sorted(mapped - modules)}"


def test_every_relative_link_of_the_readme_and_docs_resolves():
    broken = []
    for markdown in DOCS:
        for target in LINK.findall(prose(markdown.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            linked = (markdown.parent / path).resolve() if path else markdown
            if not linked.exists():
                broken.append(f"{markdown.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{markdown.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_is_a_landing_page():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines: move the reference into docs/ (at most ~200)"


def test_the_docs_set_no_retired_environment_variable():
    """Retired switches do nothing when set: a doc naming one would send users after a silent no-op."""
    found = [f"{markdown.relative_to(ROOT)}: {name}" for markdown in DOCS for name in RETIRED_VARIABLES
             if name in markdown.read_text()]
    assert not found, found


def test_the_flag_reference_is_what_the_parsers_say_now():
    generator = load_flag_reference()
    committed = generator.OUTPUT.read_text() if generator.OUTPUT.exists() else ""
    assert committed == generator.render(), f"docs/flags.md is stale: run `{generator.REGENERATE}` and commit it"


def test_check_names_the_command_when_the_reference_is_stale(tmp_path, monkeypatch, capsys):
    generator = load_flag_reference()
    monkeypatch.setattr(generator, "ROOT", tmp_path)
    monkeypatch.setattr(generator, "OUTPUT", tmp_path / "docs" / "flags.md")
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
    generator.OUTPUT.write_text(generator.OUTPUT.read_text().replace("`--rank`", "`--rang`"))
    assert generator.main(["--check"]) == 1
    assert "python scripts/flag_reference.py" in capsys.readouterr().err

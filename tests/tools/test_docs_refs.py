"""Every documentation reference in the repository points at a file of the repository.

A clone has ``docs/`` and nothing beside the repository, so code, configs and docs must not cite
notes that live outside it (the team's recipe / design / megatron-core notes, a ``../shared``
folder), every ``docs/<name>.md`` they cite must exist, and every "docs/<name>.md section N" must
name a numbered section (``## N.``) of that file. The README's layout block must name every module
of the package, so it cannot silently fall behind the code.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()
# Built from parts so that this file does not match its own patterns.
OUTSIDE = re.compile("|".join([r"M2OMNI", r"DESIGN\.md", r"MCORE_NOTES", r"\.\./shared",
                               r"/work/" + "shared"]))
DOC_PATH = re.compile(r"(?<![\w/.])docs/([\w.-]+\.md)")
SECTION_REF = re.compile(r"(?<![\w/.])docs/([\w.-]+\.md),?\s+sections?\s+(\d+)"
                         r"(?:\s*(?:-|and|,)\s*(\d+))?")
# "docs/x.md" of another project (BENCHMARKS.md quotes Megatron-Bridge's) is not ours.
FOREIGN = re.compile(r"(Megatron-Bridge|Megatron-LM|transformers)\W{0,3}$")
SKIP_DIRS = {".git", ".venv", "__pycache__", "demo_out", ".pytest_cache", ".ruff_cache"}


def repo_files() -> list[str]:
    """The repository's text files (git's view when this is a work tree, else a walk)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [f for f in out.splitlines() if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(REPO):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
            files += [(Path(d) / n).relative_to(REPO).as_posix() for n in names]
    out = []
    for f in sorted(set(files)):
        p = REPO / f
        if f == THIS or not p.is_file():
            continue
        try:
            out.append((f, p.read_text()))
        except (UnicodeDecodeError, OSError):
            continue  # binary fixtures
    return out


FILES = repo_files()


def test_no_reference_to_notes_outside_the_repository():
    hits = [f"{f}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for f, text in FILES for m in OUTSIDE.finditer(text)]
    assert not hits, "references to files a clone does not have (cite docs/ instead):\n" + \
        "\n".join(hits)


def _ours(text: str, start: int) -> bool:
    return not FOREIGN.search(text[text.rfind("\n", 0, start) + 1:start])


def test_every_cited_doc_exists():
    missing = sorted({f"{f}: docs/{m.group(1)}" for f, text in FILES
                      for m in DOC_PATH.finditer(text)
                      if _ours(text, m.start()) and not (REPO / "docs" / m.group(1)).is_file()})
    assert not missing, "cited docs that do not exist:\n" + "\n".join(missing)


def _sections(doc: str) -> set[int]:
    text = (REPO / "docs" / doc).read_text()
    return {int(n) for n in re.findall(r"^## (\d+)\.", text, flags=re.M)}


def test_cited_sections_exist():
    bad = []
    for f, text in FILES:
        for m in SECTION_REF.finditer(text):
            if not _ours(text, m.start()) or not (REPO / "docs" / m.group(1)).is_file():
                continue  # reported by test_every_cited_doc_exists
            have = _sections(m.group(1))
            for n in (m.group(2), m.group(3)):
                if n is not None and int(n) not in have:
                    bad.append(f"{f}: {m.group(0)!r} but docs/{m.group(1)} has sections "
                               f"{sorted(have)}")
    assert not bad, "\n".join(bad)


def test_recipe_and_architecture_sections_are_numbered():
    # What the references above rely on: the recipe keeps the numbering the code cites.
    assert {1, 2, 3, 4, 5, 6, 7} <= _sections("recipe.md")
    assert {1, 2, 3, 4, 5, 6} <= _sections("architecture.md")


def test_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    missing = []
    for path in sorted((REPO / "megatron_omni").rglob("*.py")):
        rel = path.relative_to(REPO / "megatron_omni")
        if path.name == "__init__.py" or "__pycache__" in rel.parts:
            continue
        # A module is named by its file name, or covered by its sub-package's "name/" entry.
        covered = path.name in block or path.stem + "." in block or any(
            f"{part}/" in block for part in rel.parts[1:-1])
        if not covered:
            missing.append(str(rel))
    assert not missing, f"README.md's layout does not mention {missing}"

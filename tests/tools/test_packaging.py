"""The package's command-line surface and dependency lists: every console script of
pyproject.toml resolves to a ``main``, every ``tools/*.py`` is a shim of one, the runtime
dependencies match requirements.txt, test-only packages stay out of the package, and no file
edits the import path or loads a module from a file path."""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]

EXPECTED_SCRIPTS = {
    "omni-train", "omni-preprocess", "omni-convert", "omni-convert-data", "omni-generate",
    "omni-plan", "omni-demo", "omni-merge-parts", "omni-gpu-check", "omni-synthetic-data",
    "omni-plot",
}


def _python_files():
    skip = {".venv", "demo_out", ".git", "build"}
    for p in sorted(REPO.rglob("*.py")):
        rel = p.relative_to(REPO)
        if not skip & set(rel.parts) and not rel.parts[0].startswith("."):
            yield rel, p


def test_every_console_script_resolves_to_a_main():
    assert set(SCRIPTS) == EXPECTED_SCRIPTS
    for name, target in SCRIPTS.items():
        module, attr = target.split(":")
        fn = getattr(importlib.import_module(module), attr)
        assert callable(fn), name


def test_tools_are_shims_of_console_scripts():
    targets = {tuple(t.split(":")) for t in SCRIPTS.values()}
    shims = sorted((REPO / "tools").glob("*.py")) + [REPO / "slurm" / "merge_parts.py"]
    assert len(shims) == 9
    for shim in shims:
        tree = ast.parse(shim.read_text())
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert len(imports) == 1, shim
        (imp,) = imports
        assert [a.name for a in imp.names] == ["main"], shim
        assert (imp.module, "main") in targets, shim
        # Nothing but the docstring, the import and the __main__ guard.
        assert len(tree.body) == 3, shim


def _requirement_names(lines) -> list[str]:
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def test_runtime_dependencies_match_requirements_txt():
    reqs = _requirement_names((REPO / "requirements.txt").read_text().splitlines())
    assert sorted(PYPROJECT["project"]["dependencies"]) == sorted(reqs)
    assert not any(r.startswith("torch") for r in reqs)  # installed first and pinned (Makefile)
    dev = _requirement_names((REPO / "requirements-dev.txt").read_text().splitlines())
    assert "kaldi-native-fbank" in dev and "kaldi-native-fbank" not in reqs
    assert any(r.startswith("transformers") for r in dev)
    assert not any(r.startswith("transformers") for r in reqs)
    assert any(r.startswith("transformers") for r in
               PYPROJECT["project"]["optional-dependencies"]["convert"])


def test_test_only_packages_are_not_imported_by_the_package():
    """kaldi-native-fbank is the tests' reference only; transformers is imported inside the one
    function that needs it (``convert verify``), never when a module loads."""
    for rel, p in _python_files():
        if rel.parts[0] != "megatron_omni":
            continue
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""])
                assert not any(n.split(".")[0] == "kaldi_native_fbank" for n in names), rel
        for node in tree.body:  # module level
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""])
                assert not any(n.split(".")[0] == "transformers" for n in names), rel


def test_no_import_path_hacks():
    pattern = re.compile(r"sys\.path\b|spec_from_" + "file_location")
    found = [f"{rel}:{i}" for rel, p in _python_files()
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []

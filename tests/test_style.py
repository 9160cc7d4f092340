"""House rules that CI checks: ruff lint and format, library code that logs instead of printing, no issue numbers
in code, and one owner of the pixel normalisation."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("bundle", "scripts", "tests", "configs")


def ruff() -> str:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]' (CI runs it)")
    return found


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    done = subprocess.run([ruff(), *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def files(*suffixes: str):
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in suffixes and "__pycache__" not in path.parts:
                yield path


def test_library_code_logs_instead_of_printing():
    """``print`` in bundle/ only inside command-line entry points (functions named ``main``)."""
    offenders = []
    for path in (REPO / "bundle").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        allowed = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name == "main"
                   for node in ast.walk(fn)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and id(node) not in allowed:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_no_issue_numbers_or_reference_notes_in_code():
    pattern = re.compile(r"\bissue\s*#?\d+|REFERENCE\.md", re.IGNORECASE)
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in files(".py", ".json")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and path.name != "test_style.py"
    ]
    assert not hits, hits


def test_pixel_normalisation_has_one_owner():
    """The scheme is defined by the networks (bundle/networks, the other network runtimes' own attribute) and is
    otherwise only the configs' override id; no other module scales inputs by its own reading of it."""
    runtimes = {"bundle/export/compiled.py", "bundle/export/onnx_runtime.py"}
    outside = sorted(
        str(path.relative_to(REPO))
        for path in files(".py", ".json")
        if "pixel_normalization" in path.read_text()
        and path.parts[len(REPO.parts)] in ("bundle", "configs")
        and not str(path.relative_to(REPO)).startswith("bundle/networks/")
        and str(path.relative_to(REPO)) not in runtimes
        and not path.name.endswith(".json")
    )
    assert not outside, outside
    for path in (REPO / "configs").glob("*.json"):
        for line in path.read_text().splitlines():
            if "pixel_normalization" in line:
                assert re.fullmatch(
                    r'\s*"pixel_normalization": (null|"sam"|"litemedsam"|"@pixel_normalization"),?', line
                ), f"{path.name}: {line.strip()}"

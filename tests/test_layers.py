"""The package's layers (README, "Layout of the repository"): each part of src/fp6llm imports only the parts below
it, so that, e.g., the kernels never reach for a model and the models never reach for the engine. Read from the
source's import statements (no import is run)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "fp6llm"
# lowest first; a part may import any part of a lower layer
LAYERS = [
    {"formats"},
    {"packing"},
    {"quantize"},
    {"kernels"},
    {"ops", "decoder_ops"},
    {"nn"},
    {"fused"},
    {"models"},
    {"engine"},
    {"evals", "server", "integrations"},
    {"cli", "commands"},  # the command line: cli.py registers the commands, which share its argument helpers
]
FACADES = {"__init__", "__main__"}  # the package's public names and its `python -m` entry
RANK = {part: rank for rank, layer in enumerate(LAYERS) for part in layer}


def part_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_parts(path: Path) -> set:
    """The top-level parts of fp6llm that ``path`` imports (relative or absolute imports)."""
    package = list(path.relative_to(PACKAGE).parts[:-1])
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            parts.add(target[0] if target else node.names[0].name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fp6llm":
            names = node.module.split(".")
            parts.add(names[1] if len(names) > 1 else node.names[0].name)
        elif isinstance(node, ast.Import):
            parts.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("fp6llm.") and alias.name.count(".") >= 1)
    return {part.removesuffix(".py") for part in parts}


SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if part_of(path) not in FACADES)


def test_every_part_has_a_layer():
    assert {part_of(path) for path in SOURCES} <= set(RANK), "a new part of src/fp6llm needs its place in LAYERS"


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_point_down(path):
    part = part_of(path)
    upward = sorted(other for other in imported_parts(path) - {part}
                    if other in RANK and RANK[other] >= RANK[part] and not LAYERS[RANK[part]] >= {other, part})
    assert not upward, f"{path.relative_to(PACKAGE)} ({part}) imports {upward}, which are not below it"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """A kernel module that imports the engine is caught (the check itself can fail)."""
    fake = PACKAGE / "kernels" / "_probe_upward.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from ..engine import load\n" if self == fake
                        else Path.read_bytes(self).decode())
    assert imported_parts(fake) == {"engine"}
    with pytest.raises(AssertionError, match="imports \\['engine'\\]"):
        test_imports_point_down(fake)

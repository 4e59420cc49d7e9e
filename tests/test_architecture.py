"""The floor order of the house (docs/architecture.md): every import points down.

Reads the source (no import runs) and checks each ``import vqmed.*`` / ``from vqmed.* import``, at module
level or inside a function, against the floors below. One exception, by design: ``vqmed.config`` may
import a room's registry lazily inside a ``validate`` method (or a ``_check*`` helper it calls), so
that each name list (models, objectives, classifiers, feature variants, export arrays) has one home.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vqmed"

#: room -> floor. A room may import its own modules and rooms on lower floors only.
FLOORS = {
    "vqmed.tracking": 0,
    "vqmed.config": 0,
    "vqmed.atomic": 0,
    "vqmed.data": 1,
    "vqmed.networks": 1,
    "vqmed.models_io": 2,
    "vqmed.training": 3,
    "vqmed.export": 4,
    "vqmed.downstream": 5,
    "vqmed.prior": 5,
    "vqmed.cli": 6,
    "vqmed.__main__": 7,  # `python -m vqmed`: only calls the CLI
}


def room_of(module: str) -> str | None:
    """``vqmed.downstream.engine`` -> ``vqmed.downstream``; ``vqmed`` itself (the version) -> ``None``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[0] == "vqmed" else None


def module_name(path: Path, repo: Path) -> str:
    rel = path.relative_to(repo).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, repo: Path) -> list[tuple[str, int, list[str]]]:
    """``(imported module, line, enclosing function names)`` of every vqmed import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = module_name(path, repo)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, list[str]]] = []

    def visit(node: ast.AST, functions: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = functions + [child.name] if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else functions
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inner) for a in child.names if a.name.split(".")[0] == "vqmed")
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this file's package
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "vqmed":
                    # ``from vqmed import x`` may name a room: count each name as the module it is
                    names = [f"{target}.{a.name}" for a in child.names] if target == "vqmed" else [target]
                    found.extend((n, child.lineno, inner) for n in names)
            visit(child, inner)

    visit(tree, [])
    return found


def violations(repo: Path = REPO) -> list[str]:
    """Every import that runs up a floor or sideways into another room of the same floor."""
    out = []
    for path in sorted((repo / "vqmed").rglob("*.py")):
        source = room_of(module_name(path, repo))
        if source is None:
            continue  # vqmed/__init__.py: the package docstring and version
        assert source in FLOORS, f"{path.relative_to(repo)}: room {source} has no floor; add it to FLOORS and docs/architecture.md"
        for target_module, line, functions in imports(path, repo):
            target = room_of(target_module)
            if target is None or target == source:
                continue
            assert target in FLOORS, f"{path.relative_to(repo)}:{line} imports unknown room {target}"
            if source == "vqmed.config" and any(f == "validate" or f.startswith("_check") for f in functions):
                continue  # a registry read lazily while validating: the name list's one home
            if FLOORS[target] >= FLOORS[source]:
                out.append(f"{path.relative_to(repo)}:{line}: {source} (floor {FLOORS[source]}) imports {target_module} (floor {FLOORS[target]})")
    return out


def test_every_import_points_down_a_floor() -> None:
    assert violations() == []


def test_the_floor_test_catches_an_import_up_a_floor(tmp_path: Path) -> None:
    """The checker itself: an import up a floor, one sideways (data <-> networks) and a lazy one inside a
    function are all reported; config's lazy registry import in ``validate`` is not."""
    fake = tmp_path / "vqmed"
    for room, body in {
        "networks/bad.py": "def f():\n    from vqmed.data import ImageSpec\n",
        "data/bad.py": "import vqmed.training.engine\n",
        "export/ok.py": "from vqmed.models_io import load_model\nfrom vqmed.data.orientation import canonical_grid\n",
        "config.py": "class C:\n    def validate(self):\n        from vqmed.networks.factory import MODELS\nfrom vqmed.data import x\n",
        "tracking/bad.py": "from ..downstream import report\n",
    }.items():
        (fake / room).parent.mkdir(parents=True, exist_ok=True)
        (fake / room).write_text(body)
    found = violations(tmp_path)
    text = "\n".join(found)
    assert "networks/bad.py:2: vqmed.networks (floor 1) imports vqmed.data (floor 1)" in text
    assert "data/bad.py:1: vqmed.data (floor 1) imports vqmed.training.engine (floor 3)" in text
    assert "tracking/bad.py:1: vqmed.tracking (floor 0) imports vqmed.downstream (floor 5)" in text
    assert "config.py:4: vqmed.config (floor 0) imports vqmed.data (floor 1)" in text
    assert "export/ok.py" not in text and "config.py:3" not in text
    assert len(found) == 4


def test_each_room_docstring_says_what_it_owns() -> None:
    for room in FLOORS:
        path = PACKAGE / room.split(".")[1]
        init = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not init.exists():
            continue  # a room not built yet
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 40, f"{init.relative_to(REPO)} needs a docstring saying what the room owns"




def test_every_mlflow_call_goes_through_tracking() -> None:
    offenders = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("vqmed/tracking/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                offenders.add(rel)
    assert not offenders, sorted(offenders)

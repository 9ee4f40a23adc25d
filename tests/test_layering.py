"""The library's folders depend one way: errors <- weights <- flux <- lora <- training <- toys.

Each module's imports (top level and inside functions) are parsed with `ast`; a module that imports a
folder above its own fails, and so does library code that imports cog (only the adapters may).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a module may import its own layer and the ones before it.
LAYERS = ["errors", "weights", "flux", "lora", "training", "toys"]


def _layer_of(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in LAYERS else None


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _library_files() -> list[Path]:
    files = [ROOT / "errors.py"]
    for layer in LAYERS[1:]:
        files += sorted((ROOT / layer).rglob("*.py"))
    return files


def upward_imports(path: Path, root: Path = ROOT) -> list[str]:
    """The imports of `path` that point to a layer above its own, or to cog."""
    rel = path.relative_to(root)
    own = LAYERS.index(rel.parts[0].removesuffix(".py"))
    bad = []
    for line, module in _imported_modules(path):
        if module.split(".")[0] == "cog":
            bad.append(f"{rel}:{line} imports cog (only predict.py and train.py may)")
            continue
        layer = _layer_of(module)
        if layer is not None and LAYERS.index(layer) > own:
            bad.append(f"{rel}:{line} imports {module} ({layer} is above {LAYERS[own]})")
    return bad


def test_every_layer_exists():
    assert (ROOT / "errors.py").is_file()
    for layer in LAYERS[1:]:
        assert (ROOT / layer / "__init__.py").is_file(), layer


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path):
    assert upward_imports(path) == []


def test_the_check_sees_an_upward_import(tmp_path):
    # A flux/ module that imports training/ must be caught, also when the import is inside a function.
    (tmp_path / "flux").mkdir()
    bad = tmp_path / "flux" / "bad.py"
    bad.write_text("import os\n\ndef f():\n    from training.loop import train_lora\n    import cog\n")
    assert upward_imports(bad, root=tmp_path) == [
        "flux/bad.py:4 imports training.loop (training is above flux)",
        "flux/bad.py:5 imports cog (only predict.py and train.py may)",
    ]

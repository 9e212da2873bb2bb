"""The rules of the house, read from the source: who may import what, who opens files, no circles, no private names.

Every import counts, also those inside functions (kept there only so that ``--help`` stays fast).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "himatch_med"
METHOD = ("volume", "transforms", "backbone", "features", "retrieval", "matching", "fusion", "scoring", "metrics")
"""The method modules: small, pure, known-answer tested."""
METHOD_MAY_IMPORT = ("config", "errors", "features", "hub")
"""The only modules of the package a method module may import (``hub``: the backbone asks where weights come from)."""
MONAI_ALLOWED = ("volume", "transforms")
TRANSFORMERS_ALLOWED = ("backbone", "benchmark")
"""``benchmark`` makes random-initialised DINOv3 weights with transformers (as the tests do) to time the real
backbone; it is a measuring tool shipped with the package (``himatch-med benchmark``), not a room of the house."""
OPENS_FILES = ("io", "backbone", "preflight", "benchmark")
"""The modules that open files themselves: ``io``, and ``backbone``, which reads the model folder it loads (its
``config.json`` checked for custom code; transformers reads the weights), and ``preflight``, which reads a bank's
``bank.json`` before the heavy imports (``io`` imports torch), and the measuring tool ``benchmark`` (its temporary
folder, ``/proc/self/status``, its ``--json`` file). ``scan`` and ``bank.store`` store things through ``io``."""
FILE_CALLS = {
    "open", "read_text", "write_text", "read_bytes", "write_bytes", "savefig", "ReadImage", "WriteImage",
    "ImageSeriesReader", "ImageFileReader", "ImageFileWriter", "memmap", "NamedTemporaryFile", "TemporaryFile",
    "TemporaryDirectory", "mkstemp", "mkdtemp", "save_file", "load_file", "to_filename", "from_filename",
}
"""Calls that open files (by the last part of their name)."""
FILE_MODULE_CALLS = {("nib", "load"), ("nib", "save"), ("nibabel", "load"), ("nibabel", "save"), ("np", "load"),
                     ("np", "save"), ("numpy", "load"), ("numpy", "save"), ("torch", "load"), ("torch", "save"),
                     ("json", "load"), ("json", "dump"), ("pickle", "load"), ("pickle", "dump")}
FILE_IMPORTS = ("mmap", "tempfile", "safetensors", "shelve")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(encoding="utf-8"), str(path))
            for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


MODULES = package_modules()
PACKAGES = {module_name(p) for p in (ROOT / PACKAGE).rglob("__init__.py")}
SOURCES = {**MODULES, **{f"pipelines.{p.stem}": ast.parse(p.read_text(encoding="utf-8"), str(p))
                         for p in sorted((ROOT / "pipelines").glob("*.py"))}}


def short(name: str) -> str:
    """``himatch_med.bank.store`` -> ``bank.store``."""
    return name.removeprefix(PACKAGE + ".")


def imports(tree: ast.Module, module: str) -> list[tuple[str, list[str]]]:
    """``(imported module, names taken from it)`` for every import statement; relative imports resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                parts = module.split(".") if module in PACKAGES else module.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                source = ".".join([*parts, source] if source else parts)
            names = [alias.name for alias in node.names]
            # `from package import module` imports the module; `from module import name` the module itself.
            submodules = [f"{source}.{n}" for n in names if f"{source}.{n}" in MODULES]
            found.append((source, [n for n in names if f"{source}.{n}" not in MODULES]))
            found.extend((sub, []) for sub in submodules)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("module", METHOD)
def test_method_modules_import_no_monai_io_transformers_or_rooms_of_the_house(module):
    imported = [name for name, _ in imports(MODULES[f"{PACKAGE}.{module}"], f"{PACKAGE}.{module}")]
    assert all(top(name) != "monai" for name in imported) or module in MONAI_ALLOWED
    assert all(top(name) != "transformers" for name in imported) or module in TRANSFORMERS_ALLOWED
    ours = {short(name) for name in imported if top(name) == PACKAGE and name != PACKAGE}
    assert ours <= set(METHOD_MAY_IMPORT), f"{module} imports {sorted(ours - set(METHOD_MAY_IMPORT))}"


def test_monai_only_in_volume_and_transforms_and_transformers_only_in_backbone():
    for module, tree in MODULES.items():
        tops = {top(name) for name, _ in imports(tree, module)}
        if "monai" in tops:
            assert short(module) in MONAI_ALLOWED, f"{module} imports monai"
        if "transformers" in tops:
            assert short(module) in TRANSFORMERS_ALLOWED, f"{module} imports transformers"


def file_openings(tree: ast.Module) -> list[str]:
    """What in a module opens a file itself: calls and imports, as ``line: text``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Name) and function.id in FILE_CALLS:
                found.append(f"{node.lineno}: {function.id}(")
            elif isinstance(function, ast.Attribute):
                owner = function.value.id if isinstance(function.value, ast.Name) else None
                if owner == "io":  # himatch_med.io, the way to open files
                    continue
                if owner == "distribution" and function.attr == "read_text":  # importlib.metadata: package metadata
                    continue
                if function.attr in FILE_CALLS or (owner, function.attr) in FILE_MODULE_CALLS:
                    found.append(f"{node.lineno}: {owner or '...'}.{function.attr}(")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found.extend(f"{node.lineno}: import {n}" for n in names if top(n) in FILE_IMPORTS)
    return found


def test_only_io_opens_files():
    offenders = {module: file_openings(tree) for module, tree in MODULES.items() if short(module) not in OPENS_FILES}
    assert {module: lines for module, lines in offenders.items() if lines} == {}
    assert file_openings(MODULES[f"{PACKAGE}.io"])  # the check does see files being opened


def test_the_file_check_catches_each_way_of_opening_a_file():
    source = ("import tempfile\nopen('x')\nPath('x').read_text()\nnib.load('x')\nimage.to_filename('x')\n"
              "figure.savefig('x')\njson.load(handle)\njson.loads(text)\nio.read_text('x')\n")
    found = file_openings(ast.parse(source))
    assert [line.split(": ")[0] for line in found] == ["1", "2", "3", "4", "5", "6", "7"]


def test_no_import_circles():
    graph = {module: {name for name, _ in imports(tree, module) if name in MODULES and name != module}
             for module, tree in MODULES.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(imported):], imported]))
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def private_imports(tree: ast.Module, module: str) -> list[str]:
    """Private names of another module of the package this module imports or reaches by attribute."""
    found = []
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for source, names in imports(ast.Module(body=[node], type_ignores=[]), module):
                if top(source) == PACKAGE and source != module:
                    found.extend(f"from {source} import {n}" for n in names
                                 if n.startswith("_") and not n.startswith("__"))
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in MODULES:
                    aliases[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if top(alias.name) == PACKAGE and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_a_private_name_of_another():
    tests = {f"tests.{p.stem}": ast.parse(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "tests").glob("*.py"))}
    offenders = {module: private_imports(tree, module) for module, tree in {**SOURCES, **tests}.items()}
    assert {module: names for module, names in offenders.items() if names} == {}


def test_the_private_name_check_sees_both_ways():
    source = "from himatch_med.jobs import _x, read\nfrom himatch_med import cli\ncli._helper(1)\n"
    assert private_imports(ast.parse(source), "pipelines.x") == ["from himatch_med.jobs import _x",
                                                                  "himatch_med.cli._helper"]


def test_the_circle_check_sees_function_level_and_relative_imports():
    tree = ast.parse("def f():\n    from himatch_med.run import main\n")
    assert imports(tree, "himatch_med.bank.data") == [("himatch_med.run", ["main"])]
    tree = ast.parse("from . import store\nfrom ..jobs import read\n")
    assert imports(tree, "himatch_med.bank.data") == [("himatch_med.bank", []), ("himatch_med.bank.store", []),
                                                      ("himatch_med.jobs", ["read"])]

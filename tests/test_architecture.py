"""The house rules of sdlora/'s layout, read from the source with `ast`: imports only point down the floors, no
cycles between packages or modules, no file over 450 lines, no function in train/ over 50, typer only in cli/,
families never import the test helpers."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sdlora"

# The floors (STYLE.md), highest first. A package may import its own floor (sideways; the cycle checks keep that
# honest) and any floor below it, never one above. "sdlora" is the package itself (__init__: the version only).
FLOORS: list[set[str]] = [
    # The shells: the CLI (`options` is its table of which option sets which setting), `python -m sdlora`, the
    # web app (it starts training as a process and calls the library).
    {"cli", "options", "__main__", "serve"},
    # The commands' libraries. `demo` runs prep -> train -> generate -> eval; `testing` builds tiny pipelines from
    # the families for tests and the demo's toy base, so it sits above families (which must never import it).
    {"train", "generate", "evaluation", "prep", "demo", "testing", "compare"},
    # Model knowledge. `models` loads a base by asking the family registry (detection, single-file loading) and
    # lora's readers use its file checks, so it lives with families and lora, not at the ground. `hub` finds where a
    # base named by the user lives (path, hub id, cache); `weights` checks weight files before anything loads them.
    # `comfyui` writes ComfyUI workflows from what the families say (and ComfyUI's node list, as data); `quantization`
    # and `fp8` store the frozen denoiser quantized (--quantize).
    {"families", "lora", "faces", "models", "hub", "weights", "comfyui", "quantization", "fp8"},
    # The ground: no sdlora import above it. `settings` is the config's sections (config.py puts them together);
    # `preflight` checks output folders and free disk space, `env` collects versions for bug reports, `quiet`
    # turns the libraries' logging down: none of them knows a model.
    {"config", "settings", "objectives", "fsutil", "errors", "layout", "preflight", "env", "quiet", "sdlora"},
]
FLOOR = {package: len(FLOORS) - index for index, floor in enumerate(FLOORS) for package in floor}

MAX_FILE_LINES = 450
MAX_TRAIN_FUNCTION_LINES = 50


@dataclass(frozen=True)
class Import:
    file: Path  # the importing file
    line: int
    source: str  # importing module, e.g. sdlora.train.data
    target: str  # imported module, e.g. sdlora.prep.manifest

    def __str__(self) -> str:
        return f"{self.file.relative_to(ROOT.parent)}:{self.line}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """`name` (sdlora.x.y) is a module or package of sdlora/."""
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_of(module: str) -> str:
    """sdlora.train.data -> train; sdlora.cli -> cli; sdlora -> sdlora."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def imports_of(path: Path, text: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every import in `path` (or `text` as if it were there): top level, inside
    functions, under TYPE_CHECKING; relative ones made absolute."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    text = path.read_text(encoding="utf-8") if text is None else text
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:  # `from sdlora.demo import world` imports the module sdlora.demo.world
                candidate = f"{base_name}.{alias.name}"
                yield node.lineno, candidate if is_module(candidate) else base_name


def sdlora_imports() -> list[Import]:
    found = []
    for path in sources():
        source = module_name(path)
        for line, target in imports_of(path):
            if target == "sdlora" or target.startswith("sdlora."):
                found.append(Import(path, line, source, target))
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def describe_cycles(imports: list[Import], key) -> list[str]:
    """Each cycle of the graph whose nodes are `key(module)`, with the imports that make it."""
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        a, b = key(imp.source), key(imp.target)
        if a != b:
            edges[a].add(b)
    lines = []
    for component in cycles(edges):
        members = set(component)
        lines.append(f"cycle between {', '.join(component)}:")
        making = [imp for imp in imports if key(imp.source) in members and key(imp.target) in members]
        lines += dict.fromkeys(f"    {imp}" for imp in making if key(imp.source) != key(imp.target))
    return lines


def test_every_package_has_a_floor():
    """A new top-level module or package must be given its floor here (and in STYLE.md)."""
    packages = {package_of(module_name(path)) for path in sources()}
    assert not packages - FLOOR.keys(), f"give these a floor in FLOORS: {sorted(packages - FLOOR.keys())}"


def test_imports_only_point_down():
    upward = [
        f"{imp}  ({package_of(imp.source)} is on floor {FLOOR[package_of(imp.source)]}, "
        f"{package_of(imp.target)} on {FLOOR[package_of(imp.target)]})"
        for imp in sdlora_imports()
        if FLOOR.get(package_of(imp.target), 0) > FLOOR.get(package_of(imp.source), 0)
    ]
    assert not upward, "imports pointing up a floor:\n" + "\n".join(upward)


def test_no_cycles_between_packages():
    found = describe_cycles(sdlora_imports(), package_of)
    assert not found, "\n".join(found)


def test_no_two_modules_import_each_other():
    """No cycles between modules either, inside a package included. A package's __init__ importing its own
    modules (a registry naming its families, a front door re-exporting its entry point) is not counted: those
    modules may use what the __init__ defines (the Family protocol), as peft's tuners/ and torchtune's models/ do."""
    inward = [imp for imp in sdlora_imports() if not imp.target.startswith(imp.source + ".")]
    found = describe_cycles(inward, lambda module: module)
    assert not found, "\n".join(found)


def test_no_file_over_450_lines():
    long = [
        f"{path.relative_to(ROOT.parent)}: {count} lines"
        for path in sources()
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    ]
    assert not long, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(long)


def test_no_function_in_train_over_50_lines():
    long = []
    for path in sorted((ROOT / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                count = node.end_lineno - node.lineno + 1
                if count > MAX_TRAIN_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {node.name} is {count} lines")
    assert not long, f"functions in train/ over {MAX_TRAIN_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_only_cli_imports_typer_or_click():
    found = [
        f"{path.relative_to(ROOT.parent)}:{line}: imports {name}"
        for path in sources()
        if not path.is_relative_to(ROOT / "cli")
        for line, name in imports_of(path)
        if name.split(".")[0] in ("typer", "click")
    ]
    assert not found, "only sdlora/cli/ may import typer (never click):\n" + "\n".join(found)


def test_cli_imports_typer_not_click():
    modules = sorted((ROOT / "cli").glob("*.py"))
    names = {name.split(".")[0] for path in modules for _, name in imports_of(path)}
    assert "typer" in names and "click" not in names
    assert all("typer" in {n.split(".")[0] for _, n in imports_of(p)} for p in modules if p.name != "__init__.py")


def test_families_never_import_testing():
    found = [
        str(imp)
        for imp in sdlora_imports()
        if package_of(imp.source) == "families" and package_of(imp.target) == "testing"
    ]
    assert not found, "families must not import sdlora.testing:\n" + "\n".join(found)


def test_the_checks_can_fail():
    """The reader sees imports in functions and under TYPE_CHECKING and relative ones; a cycle is found."""
    text = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from sdlora.train import data\n"
        "def f():\n    from sdlora.cli import app\n"
        "from . import dlib\nfrom ..demo import toy\n"
    )
    found = sorted(name for _, name in imports_of(ROOT / "faces" / "backends.py", text))
    assert found == ["sdlora.cli", "sdlora.demo.toy", "sdlora.faces.dlib", "sdlora.train.data", "typing"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

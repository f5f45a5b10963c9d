"""The library's architecture as a rule: packages in layers that only import downward, and no import cycles
(imports inside functions count too: they hide a cycle, they do not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first: a package may import only from the packages before it (and the bare `difftune`, its version).
LAYERS = ["cli", "storage", "data", "models", "formats", "adapters", "generate", "train"]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module below `root` (a package's __init__ under the package's name)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that the module `name` imports anywhere in its file (top level or in a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` imports a.b.c's nearest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]], top: str, layers: list[str]) -> list[str]:
    """Imports that point up the layers, and modules in no package of the list."""

    def layer(module: str) -> int | None:
        parts = module.split(".")
        if parts == [top]:
            return -1  # the bare package (its version) sits below everything
        return layers.index(parts[1]) if len(parts) > 1 and parts[1] in layers else None

    problems = []
    for module, targets in sorted(graph.items()):
        own = layer(module)
        if own is None:
            problems.append(f"{module} is in no package of the layer list: move it into one, or add its package")
            continue
        for target in sorted(targets):
            if target.split(".")[0] != top:
                continue
            theirs = layer(target)
            if theirs is not None and theirs > own:  # (within one package, only a cycle is wrong)
                problems.append(f"{module} imports {target}: {layers[theirs]} sits above {layers[own]}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_own_init_edges_removed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Without the edges of a package's __init__ to its own modules: re-exporting them is how a package shows
    its public names, and Python imports the package before its modules in any case."""
    return {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}


def test_the_library_imports_only_downward_and_has_no_cycles():
    graph = import_graph(SRC)
    assert "difftune.train.loop" in graph and "difftune.cli.errors" in graph["difftune.train.loop"]
    problems = layer_violations(graph, "difftune", LAYERS)
    assert not problems, "imports against the layers (move the shared part down):\n" + "\n".join(problems)
    found = cycles(package_own_init_edges_removed(graph))
    assert not found, "modules that import each other (one concept in two places?): " + "; ".join(map(str, found))


def test_at_most_twelve_entries_each_package_says_what_it_holds_and_may_import():
    entries = [p for p in (SRC / "difftune").iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 12, sorted(p.name for p in entries)
    packages = sorted(p.name for p in entries if p.is_dir())
    assert packages == sorted(LAYERS), "every package has its place in LAYERS"
    for name in packages:
        docstring = ast.get_docstring(ast.parse((SRC / "difftune" / name / "__init__.py").read_text())) or ""
        assert len(docstring) > 80 and ("import" in docstring), f"{name}/__init__.py: what lives here, what it imports"


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cli/a.py": "def f():\n    from pkg.train import b\n", "train/b.py": ""}, "pkg.cli.a imports pkg.train.b"),
        ({"cli/a.py": "", "train/b.py": "from ..cli import a\n"}, None),
        ({"stray.py": ""}, "pkg.stray is in no package"),
    ],
)
def test_the_layer_check_sees_upward_imports_even_inside_functions(tmp_path, files, expected):
    for name, text in {"__init__.py": "", "cli/__init__.py": "", "train/__init__.py": "", **files}.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    problems = layer_violations(import_graph(tmp_path), "pkg", ["cli", "train"])
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    files = {
        "__init__.py": "",
        "models/__init__.py": "from pkg.models.a import f\n",
        "models/a.py": "import pkg.models.b\n\ndef f():\n    pass\n",
        "models/b.py": "def g():\n    from pkg.models import a\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = package_own_init_edges_removed(import_graph(tmp_path))
    assert cycles(graph) == [["pkg.models.a", "pkg.models.b"]]
    files["models/b.py"] = "def g():\n    pass\n"
    (tmp_path / "pkg" / "models" / "b.py").write_text(files["models/b.py"])
    assert cycles(package_own_init_edges_removed(import_graph(tmp_path))) == []

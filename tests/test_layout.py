"""The package's import graph runs one way, bottom to top, with no circles (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trtllm_bdlora"

# bottom to top; a module may import from its own layer and the layers below
LAYERS = (
    ("errors", "versions", "logs", "config"),
    ("llama",),
    ("adapters",),
    ("sharding",),
    ("kernels", "distributed"),
    ("engine",),
    ("serving", "serving.metrics"),
    ("serving.repository",),
    ("serving.kserve", "serving.openai"),
    ("serving.server",),
    ("trtllm",),
    ("perf",),
    ("cli",),
    ("__main__",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest name in LAYERS that is the module or a package holding it."""
    matches = [(len(n), i) for i, names in enumerate(LAYERS) for n in names if module == n or module.startswith(n + ".")]
    if not matches:
        raise AssertionError(f"trtllm_bdlora.{module} is in no layer of tests/test_layout.py")
    return max(matches)[1]


def imports(path: Path) -> set[str]:
    """Every trtllm_bdlora module a file imports, lazy imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trtllm_bdlora"):
            base = node.module.removeprefix("trtllm_bdlora").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").is_file()
                          or (PACKAGE / sub.replace(".", "/")).is_dir() else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("trtllm_bdlora.") for a in node.names if a.name.startswith("trtllm_bdlora.")}
    return {m for m in found if m}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    for module in graph():
        if module:
            layer_of(module)


def test_no_upward_imports():
    upward = [f"{m} -> {d}" for m, deps in graph().items() if m for d in deps if layer_of(d) > layer_of(m)]
    assert not upward, "imports that run upward:\n" + "\n".join(sorted(upward))


def test_no_circles():
    edges = {m: {d for d in deps if d != m} for m, deps in graph().items()}
    for m in list(edges):  # an import of a package is an import of its __init__ only
        edges[m] = {d for d in edges[m] if d in edges}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_argparse_below_cli():
    """Commands parse their flags in cli/ only; everything below takes configuration values (config.py)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path).split(".")[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{module_name(path)} imports {n}" for n in names if n.split(".")[0] == "argparse"]
    assert not found, "\n".join(found)

"""The package's import graph: no circles, and the model/inference layer imports nothing above it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qinglm"
# The model and inference layer: none of these may import training, fine-tuning, serving or the CLI.
INFERENCE = tuple(
    f"{pkg}.{p.stem}"
    for pkg in ("model", "infer")
    for p in (PACKAGE / pkg).glob("*.py")
    if p.stem != "__init__"
) + ("tokenizer",)
ABOVE = (
    "qinglm.train",
    "qinglm.sft",
    "qinglm.post",
    "qinglm.serve",
    "qinglm.cli",
    "qinglm.api",
    "qinglm.pipeline",
)


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Return {module: the qinglm modules it imports}, lazy and type-checking imports included."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import submodule` imports the submodule; `from mod import name`, the module
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name not in (m, "qinglm"):
                    graph[m].add(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import circle as a list of modules, or None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_circles():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_inference_layer_imports_nothing_above_it():
    graph = import_graph()
    bad = {m: sorted(n for n in graph[f"qinglm.{m}"] if n.startswith(ABOVE)) for m in INFERENCE}
    assert not any(bad.values()), bad


def test_the_command_line_builds_without_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom qinglm.cli import main\n"
        "try:\n    main(['export', 'gguf', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_only_command_modules_hold_argparse_code():
    allowed = {"qinglm.cli", "qinglm.data.commands", "qinglm.config"}  # config: flags made from fields
    holders = {
        m
        for m, path in _modules().items()
        if "argparse" in path.read_text(encoding="utf-8") and not m.endswith(("_cli", ".cli"))
    }
    assert holders <= allowed, sorted(holders - allowed)

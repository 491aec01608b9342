"""The house rules a newcomer relies on: two layers, one direction, and code small enough to read.

The library (distill/) is importable and testable alone: it never imports the stages,
the orchestration (pipelines/: the `distill` CLI, flows, sweeps, experiments), the
tests or the benchmarks. Stages import the library only. Inside the library no two
modules import each other, however indirectly (a registry filled by the module that
defines an entry keeps it so). Functions stay short enough to read in one go.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

ABOVE_THE_LIBRARY = ("stages", "pipelines", "tests", "benchmarks", "scratch", "conftest")


def imports(path: Path) -> set[str]:
    """Every module name `path` imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def library_imports(path: Path) -> set[str]:
    """The distill/ modules `path` imports, at any depth: `import distill.x`, `from distill.x import y`
    and `from distill import x` all import x."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("distill.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "distill":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("distill."):
                found.add(node.module.split(".")[1])
    return found


def an_import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (module -> the modules it imports) as the path a -> b -> ... -> a, or None:
    a depth-first search that meets a module already on its path."""
    finished: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in finished:
            return None
        for imported in sorted(graph.get(module, ())):
            if (cycle := visit(imported, path + [module])) is not None:
                return cycle
        finished.add(module)
        return None

    return next((cycle for start in sorted(graph) if (cycle := visit(start, [])) is not None), None)


def functions(path: Path) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


LIBRARY = sorted((REPO / "distill").glob("*.py"))
STAGES = sorted((REPO / "stages").glob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_the_library_never_imports_the_layers_above_it(path):
    above = sorted(name for name in imports(path) if name.split(".")[0] in ABOVE_THE_LIBRARY)
    assert not above, f"distill/{path.name} imports {above}"


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_a_stage_imports_the_library_and_its_own_plumbing_only(path):
    above = sorted(name for name in imports(path) if name.split(".")[0] in ("pipelines", "tests", "benchmarks"))
    assert not above, f"stages/{path.name} imports {above}"


def test_the_layer_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipelines.flow import pipeline\n    return pipeline\n")
    assert "pipelines.flow" in imports(module)


def test_no_two_library_modules_import_each_other_even_through_others():
    names = {path.stem for path in LIBRARY}
    cycle = an_import_cycle({path.stem: library_imports(path) & names for path in LIBRARY})
    assert cycle is None, f"distill/ has an import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_sees_a_cycle_closed_by_an_import_inside_a_function(tmp_path):
    (tmp_path / "a.py").write_text("from distill.b import f\n")
    (tmp_path / "b.py").write_text("import distill.c\n")
    (tmp_path / "c.py").write_text("def g():\n    from distill import a\n    return a\n")
    graph = {p.stem: library_imports(p) for p in sorted(tmp_path.glob("*.py"))}
    assert an_import_cycle(graph) == ["a", "b", "c", "a"]
    assert an_import_cycle(graph | {"c": set()}) is None


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_no_library_function_takes_more_than_eight_parameters(path):
    for fn in functions(path):
        args = fn.args
        count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
        count -= bool(args.args) and args.args[0].arg in ("self", "cls")
        assert count <= 8, f"distill/{path.name}: {fn.name} takes {count} parameters"


def test_the_one_training_loop_reads_in_one_go():
    (fit,) = [fn for fn in functions(REPO / "distill" / "loop.py") if fn.name == "fit"]
    assert fit.end_lineno - fit.lineno + 1 <= 60


@pytest.mark.parametrize("path", [REPO / "distill" / "training.py", REPO / "distill" / "lm.py"], ids=lambda p: p.name)
def test_every_task_trains_in_the_one_loop(path):
    """No task keeps an optimizer loop of its own: the optimizer, the backward pass and the
    schedule's step are written once, in distill/loop.py."""
    source = path.read_text()
    for own_loop in ("torch.optim.AdamW(", ".backward()", "sched.step()", "DistributedDataParallel("):
        assert own_loop not in source, f"distill/{path.name} has {own_loop}"

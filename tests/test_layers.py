"""The house rules a newcomer relies on: two layers, one direction, and code small enough to read.

The library (distill/) is importable and testable alone: it never imports the stages,
the orchestration (pipelines/: the `distill` CLI, flows, sweeps, experiments), the
tests or the benchmarks. Stages import the library only. Inside the library no two
modules import each other, however indirectly (a registry filled by the module that
defines an entry keeps it so), and no two define the same top-level name: a name means
one thing, found in one place (a task's own version of a step says whose it is:
`prepare_corpus`, `evaluate_lm`). No library module is over MAX_MODULE_LINES lines, and no
function in the library, the stages or the orchestration is over MAX_FUNCTION_LINES lines
or takes more than MAX_PARAMETERS parameters. stages/ holds the six stage modules, the one
helper they share, and nothing else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

ABOVE_THE_LIBRARY = ("stages", "pipelines", "tests", "benchmarks", "scratch", "conftest")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
# names every module may define for itself: its logger, its command-line entry point
PER_MODULE_NAMES = ("log", "main")
STAGE_MODULES = ("prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate")


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


def parameters(fn: ast.FunctionDef) -> int:
    """The parameters a caller passes (`self` and `cls` not counted; *args and **kwargs one each)."""
    args = fn.args
    positional = args.posonlyargs + args.args
    count = len(positional) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
    return count - bool(positional and positional[0].arg in ("self", "cls"))


def top_level_names(path: Path) -> set[str]:
    """The names `path` defines at module level (functions, classes, assignments), less dunders
    and PER_MODULE_NAMES; imported names are not definitions."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return {n for n in names if not (n.startswith("__") and n.endswith("__")) and n not in PER_MODULE_NAMES}


def defined_twice(paths: list[Path]) -> dict[str, list[str]]:
    """Each top-level name defined in more than one of `paths`: name -> the files, by name."""
    where: dict[str, list[str]] = {}
    for path in paths:
        for name in top_level_names(path):
            where.setdefault(name, []).append(path.name)
    return {name: files for name, files in sorted(where.items()) if len(files) > 1}


LIBRARY = sorted((REPO / "distill").glob("*.py"))
STAGES = sorted((REPO / "stages").glob("*.py"))
ORCHESTRATION = sorted((REPO / "pipelines").glob("*.py"))
CODE = LIBRARY + STAGES + ORCHESTRATION  # where the function-size rules hold


def shown(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


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


def test_no_two_library_modules_define_the_same_top_level_name():
    twice = defined_twice(LIBRARY)
    assert not twice, "distill/ defines a name in more than one module (one definition, imported where used; " \
        "a task's own version named for its task): " + "; ".join(f"{n} in {', '.join(f)}" for n, f in twice.items())


def test_the_name_check_sees_functions_classes_and_assignments_but_not_imports_or_loggers(tmp_path):
    (tmp_path / "a.py").write_text("import logging\nfrom b import C\nlog = logging.getLogger(__name__)\n"
                                   "__all__ = ['f']\nX, Y = 1, 2\nZ: int = 3\ndef f():\n    inner = 1\n"
                                   "def main():\n    pass\n")
    (tmp_path / "b.py").write_text("log = None\nclass C:\n    X = 1\nY = 2\nasync def f():\n    pass\n"
                                   "def main():\n    pass\n")
    assert top_level_names(tmp_path / "a.py") == {"X", "Y", "Z", "f"}
    assert defined_twice(sorted(tmp_path.glob("*.py"))) == {"Y": ["a.py", "b.py"], "f": ["a.py", "b.py"]}


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_no_library_module_is_over_four_hundred_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"distill/{path.name} has {lines} lines (at most {MAX_MODULE_LINES}): " \
        "split it by concern"


@pytest.mark.parametrize("path", CODE, ids=shown)
def test_no_function_takes_more_than_eight_parameters(path):
    many = [f"{fn.name} (line {fn.lineno}) takes {n}" for fn in functions(path) if (n := parameters(fn)) > MAX_PARAMETERS]
    assert not many, f"{shown(path)}: {'; '.join(many)} parameters (at most {MAX_PARAMETERS}: pass a config object)"


@pytest.mark.parametrize("path", CODE, ids=shown)
def test_no_function_is_over_sixty_lines(path):
    long = [f"{fn.name} (line {fn.lineno}) is {n}" for fn in functions(path)
            if (n := fn.end_lineno - fn.lineno + 1) > MAX_FUNCTION_LINES]
    assert not long, f"{shown(path)}: {'; '.join(long)} lines long (at most {MAX_FUNCTION_LINES})"


def test_the_size_checks_count_parameters_as_a_caller_passes_them(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("class K:\n    def m(self, a, /, b, *args, c, **kw):\n        pass\n"
                      "def f(a, b=1):\n    x = 1\n    return x\n")
    assert {fn.name: parameters(fn) for fn in functions(module)} == {"m": 5, "f": 2}
    assert [fn.end_lineno - fn.lineno + 1 for fn in functions(module) if fn.name == "f"] == [3]


def test_stages_holds_the_six_stage_modules_their_one_helper_and_nothing_else():
    held = sorted(path.stem for path in STAGES)
    expected = sorted((*STAGE_MODULES, "common", "__init__"))
    assert held == expected, f"stages/ holds {sorted(set(held) - set(expected))} besides the six stages, common.py " \
        f"and __init__.py (orchestration goes in pipelines/, library code in distill/); " \
        f"missing: {sorted(set(expected) - set(held))}"


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

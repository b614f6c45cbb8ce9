"""Mutation testing of the program's pure modules against the fast tests (issue 10, item 11).

    nice -n 19 .venv/bin/python tests/mutation/mutate.py --out /tmp/mutation/run.jsonl [--jobs 2] [--module M ...]
        [--sample N] [--retrace] [--rerun-survivors]
    .venv/bin/python tests/mutation/mutate.py --report /tmp/mutation/run.jsonl

--sample N runs N mutants of each module drawn with a fixed seed (random.Random(0).sample), the same N
every time for the same source, and the first N of any larger sample (so a run with a larger N adds to
one with a smaller); --rerun-survivors drops the recorded survivors of the modules named and runs
them again (after tests were added; with --retrace, which traces the tests anew — the trace is kept in
OUT.cover.json and reused otherwise). Mutants judged equivalent are listed, with the reason, in
tests/mutation/equivalent.json ({module: {Site.key: reason}}); --report counts them apart.

Why not mutmut or cosmic-ray: mutmut 3 mutates only code inside functions (its README), and the
defaults that matter here are class-level (the schema's fields, the DCU profile); mutmut 2 and
cosmic-ray write each mutant over the source file, which other engineers' tests read from the same
working tree. This one never touches a file: each mutant is compiled from the mutated AST and
imported in place of its module in a forked copy of this process, which then runs pytest.

Operators (those of the issue): flip a comparison (== !=, < <=, in / not in, is / is not), swap
and/or and + - * /, drop a `not`, negate a plain condition, change a constant (int + 1, float + 1,
bool flipped, a string emptied), delete one element of a list/tuple/set or one entry of a dict,
delete one statement. Never mutated: imports, docstrings, annotations other than Literal[...].

Tests: a first run traces which test executes which line of the mutated modules; a mutant then runs
only the tests (of its module's files, fastest first, stopping at the first failure) that execute
its line, or all of them for a line that runs at import. A mutant no test executes survives
without a run. The results, one JSON line per mutant, are resumable: a rerun skips those recorded.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.abc
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNTIME = "images/runtime/"
UNIT = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests/unit").glob("test_*.py"))
SERVING = ["tests/runtime/serving/test_vllm_command.py", "tests/runtime/serving/test_quantization.py",
           "tests/runtime/serving/test_spec.py"]
# Module -> (dotted name, test files that may cover it, top-level functions to mutate: None = all).
TARGETS: dict[str, tuple[str, list[str], frozenset[str] | None]] = {
    "components/config.py": ("components.config", UNIT, None),
    "components/schema.py": ("components.schema", UNIT, None),
    "components/checks.py": ("components.checks", UNIT, None),
    "components/specs.py": ("components.specs", UNIT, None),
    "components/accelerators/profile.py": ("components.accelerators.profile", UNIT, None),
    "components/accelerators/dcu.py": ("components.accelerators.dcu", UNIT, None),
    "components/accelerators/cpu.py": ("components.accelerators.cpu", UNIT, None),
    "components/preflight.py": ("components.preflight", UNIT, None),
    "components/plan.py": ("components.plan", UNIT, None),
    "components/placement.py": ("components.placement", UNIT, None),
    RUNTIME + "node_runtime/serving/quantization.py": ("node_runtime.serving.quantization", SERVING, None),
    # The command builders and the checks on them; reading and verifying the model on disk, and the
    # exec, are the live tests' (tests/runtime/serving/test_launcher_live.py).
    RUNTIME + "node_runtime/serving/launcher.py": ("node_runtime.serving.launcher", SERVING, frozenset({
        "installed_vllm_version", "request_log_flags", "build_vllm_command", "vllm_environment", "check_layout",
        "take_slot", "check_port", "check_heads"})),
}
# Modules a mutant's copy imports afresh: ours (so every importer sees the mutant), not third-party ones.
OWN_PACKAGES = ("components", "node_runtime", "tests", "conftest")

COMPARE_FLIP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
                ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
              ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
PLAIN_TESTS = (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.NamedExpr)
KEPT_STATEMENTS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Pass,
                   ast.Global, ast.Nonlocal)


@dataclass(frozen=True)
class Site:
    """One mutant: where (a path of (field, index) from the module), what, and how it reads."""

    path: tuple[tuple[str, int | None], ...]
    kind: str
    index: int  # the operand, element or statement it changes, where the kind needs one
    line: int
    # The lines of its statement (a compound statement's header): the tests that run one of them run it.
    lines: tuple[int, int]
    scope: str  # the enclosing function or class, for reading and for the equivalents file
    before: str
    after: str

    @property
    def key(self) -> str:
        return f"{self.scope}: {self.kind}: {self.before} -> {self.after}"


def _short(node: ast.AST | str) -> str:
    text = node if isinstance(node, str) else ast.unparse(node)
    text = " ".join(text.split())
    return text if len(text) <= 100 else text[:97] + "..."


def _is_docstring(parent: ast.AST, field: str, index: int | None, node: ast.AST) -> bool:
    return (field == "body" and index == 0 and isinstance(parent, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str))


def _mutated_constant(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return "" if value else "XX"
    return None  # None, Ellipsis, bytes: nothing sensible to change to


def find_sites(tree: ast.Module, only: frozenset[str] | None = None) -> list[Site]:
    sites: list[Site] = []

    def add(path, kind, index, node, before, after, scope, lines):
        sites.append(Site(tuple(path), kind, index, getattr(node, "lineno", lines[0]), lines, scope, _short(before),
                          _short(after)))

    def visit(node: ast.AST, path: list, scope: str, lines: tuple[int, int], annotation: bool = False) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return
        if annotation:  # only Literal[...] choices mean something at run time (pydantic reads them)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
                visit(node.slice, path + [("slice", None)], scope, lines)
            else:
                for field, value in ast.iter_fields(node):
                    for i, child in (enumerate(value) if isinstance(value, list) else [(None, value)]):
                        if isinstance(child, ast.AST):
                            visit(child, path + [(field, i)], scope, lines, annotation=True)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if only is not None and scope == "<module>" and node.name not in only:
                return
            inner = node.name if scope == "<module>" else f"{scope}.{node.name}"
            for i, decorator in enumerate(node.decorator_list):
                visit(decorator, path + [("decorator_list", i)], scope, lines)
            for field in ("defaults", "kw_defaults"):
                for i, default in enumerate(getattr(node.args, field)):
                    if default is not None:
                        visit(default, path + [("args", None), (field, i)], inner, lines)
            _statements(node, "body", path, inner)
            return
        if isinstance(node, ast.ClassDef):
            inner = node.name if scope == "<module>" else f"{scope}.{node.name}"
            for i, decorator in enumerate(node.decorator_list):
                visit(decorator, path + [("decorator_list", i)], scope, lines)
            _statements(node, "body", path, inner)
            return
        if isinstance(node, ast.ExceptHandler):
            lines = _header(node)
        _expression_sites(node, path, scope, lines)
        for field, value in ast.iter_fields(node):
            if field == "format_spec":
                continue
            for i, child in (enumerate(value) if isinstance(value, list) else [(None, value)]):
                if not isinstance(child, ast.AST):
                    continue
                if isinstance(node, (ast.AnnAssign, ast.arg)) and field == "annotation":
                    visit(child, path + [(field, i)], scope, lines, annotation=True)
                elif isinstance(child, ast.stmt):
                    continue  # bodies are walked by _statements, which can delete their statements
                else:
                    visit(child, path + [(field, i)], scope, lines)
        for field in ("body", "orelse", "finalbody"):
            if isinstance(getattr(node, field, None), list) and not isinstance(node, (ast.IfExp, ast.Lambda)):
                _statements(node, field, path, scope)

    def _statements(owner: ast.AST, field: str, path: list, scope: str) -> None:
        for i, statement in enumerate(getattr(owner, field)):
            if _is_docstring(owner, field, i, statement):
                continue
            if only is not None and scope == "<module>" and isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and statement.name not in only:
                continue
            lines = _header(statement)
            if not isinstance(statement, KEPT_STATEMENTS):
                first = ast.unparse(statement).splitlines()[0]
                add(path + [(field, i)], "delete statement", i, statement, first, "pass", scope, lines)
            visit(statement, path + [(field, i)], scope, lines)

    def _expression_sites(node: ast.AST, path: list, scope: str, lines: tuple[int, int]) -> None:
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                flipped = copy.deepcopy(node)
                flipped.ops[i] = COMPARE_FLIP[type(op)]()
                add(path, "flip comparison", i, node, node, flipped, scope, lines)
        elif isinstance(node, ast.BoolOp):
            swapped = copy.deepcopy(node)
            swapped.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            add(path, "swap and/or", 0, node, node, swapped, scope, lines)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(path, "drop not", 0, node, node, node.operand, scope, lines)
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAP:
            swapped = copy.deepcopy(node)
            swapped.op = BINOP_SWAP[type(node.op)]()
            add(path, "swap operator", 0, node, node, swapped, scope, lines)
        elif isinstance(node, ast.Constant):
            changed = _mutated_constant(node.value)
            if changed is not None:
                add(path, "change constant", 0, node, repr(node.value), repr(changed), scope, lines)
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)) and isinstance(node.ctx if hasattr(node, "ctx") else ast.Load(), ast.Load):
            for i, element in enumerate(node.elts):
                add(path, "delete element", i, element, element, f"{_short(node)} without it", scope, lines)
        elif isinstance(node, ast.Dict):
            for i, (key, value) in enumerate(zip(node.keys, node.values)):
                entry = f"**{_short(value)}" if key is None else f"{_short(key)}: {_short(value)}"
                add(path, "delete entry", i, key or value, entry, "(gone)", scope, lines)
        for test in _tests_of(node):
            if isinstance(test[1], PLAIN_TESTS):
                add(path + [test[0]], "negate condition", 0, test[1], test[1], f"not {_short(test[1])}", scope, lines)

    visit(tree, [], "<module>", (0, 0))
    return sites


def _header(statement: ast.AST) -> tuple[int, int]:
    """A simple statement's lines, or a compound one's up to its body (decorators included)."""
    first = min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])])
    body = getattr(statement, "body", None)
    if isinstance(body, list) and body:
        return first, max(first, body[0].lineno - 1)
    return first, statement.end_lineno


def _tests_of(node: ast.AST):
    """(path step, expression) of the conditions a node holds."""
    if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
        yield ("test", None), node.test
    if isinstance(node, ast.comprehension):
        for i, condition in enumerate(node.ifs):
            yield ("ifs", i), condition


def _follow(tree: ast.AST, path) -> ast.AST:
    node = tree
    for field, index in path:
        node = getattr(node, field) if index is None else getattr(node, field)[index]
    return node


def _replace(tree: ast.AST, path, new: ast.AST) -> None:
    parent = _follow(tree, path[:-1])
    field, index = path[-1]
    if index is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[index] = new


def apply(tree: ast.Module, site: Site) -> ast.Module:
    tree = copy.deepcopy(tree)
    node = _follow(tree, site.path)
    if site.kind == "flip comparison":
        node.ops[site.index] = COMPARE_FLIP[type(node.ops[site.index])]()
    elif site.kind == "swap and/or":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif site.kind == "drop not":
        _replace(tree, site.path, node.operand)
    elif site.kind == "swap operator":
        node.op = BINOP_SWAP[type(node.op)]()
    elif site.kind == "change constant":
        node.value = _mutated_constant(node.value)
    elif site.kind == "delete element":
        del node.elts[site.index]
    elif site.kind == "delete entry":
        del node.keys[site.index], node.values[site.index]
    elif site.kind == "delete statement":
        _replace(tree, site.path, ast.copy_location(ast.Pass(), node))
    elif site.kind == "negate condition":
        _replace(tree, site.path, ast.copy_location(ast.UnaryOp(ast.Not(), node), node))
    else:
        raise ValueError(site.kind)
    return ast.fix_missing_locations(tree)


# ---- running -------------------------------------------------------------------------------------


class _MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports one module from a code object instead of its file."""

    def __init__(self, name: str, path: Path, code):
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        is_package = self.path.name == "__init__.py"
        return importlib.util.spec_from_file_location(fullname, self.path, loader=self,
                                                      submodule_search_locations=[str(self.path.parent)] if is_package else None)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(self.code, module.__dict__)


class _Recorder:
    """pytest plugin: the first failing test, and (tracing) which test runs which line of the targets."""

    def __init__(self, trace_files: set[str] | None = None):
        self.failed: str | None = None
        self.trace_files = trace_files
        self.current = "<import>"
        self.lines: dict[str, dict[int, set[str]]] = {f: {} for f in trace_files or ()}
        self.durations: dict[str, float] = {}

    def pytest_runtest_logreport(self, report):
        if report.failed and self.failed is None:
            self.failed = report.nodeid
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration

    def pytest_collectreport(self, report):
        if report.failed and self.failed is None:
            self.failed = f"collecting {report.nodeid}"

    def pytest_runtest_logstart(self, nodeid, location):
        self.current = nodeid

    def pytest_runtest_logfinish(self, nodeid, location):
        self.current = "<import>"

    def tracer(self, frame, event, arg):
        lines = self.lines.get(frame.f_code.co_filename)
        if lines is None:
            return None

        def local(frame, event, arg):
            if event == "line":
                lines.setdefault(frame.f_lineno, set()).add(self.current)
            return local
        lines.setdefault(frame.f_lineno, set()).add(self.current)
        return local


def _forget_own_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in OWN_PACKAGES:
            del sys.modules[name]


def _pytest_args(tests: list[str], basetemp: str) -> list[str]:
    return [*tests, "-x", "-q", "-p", "no:cacheprovider", "--basetemp", basetemp, "-o", "addopts=",
            "-W", "ignore::DeprecationWarning", "--no-header", "--tb=no", "-rN"]


def _child(module: str | None, path: Path | None, code, tests: list[str], result_file: str, trace: set[str] | None):
    """In the forked copy: import our modules afresh (the mutant in place of its module), run pytest."""
    import pytest

    os.setsid()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    _forget_own_modules()
    if module is not None:
        sys.meta_path.insert(0, _MutantFinder(module, path, code))
    recorder = _Recorder(trace)
    basetemp = tempfile.mkdtemp(prefix="mutant-")
    if trace:
        import threading

        threading.settrace(recorder.tracer)
        sys.settrace(recorder.tracer)
    try:
        rc = int(pytest.main(_pytest_args(tests, basetemp), plugins=[recorder]))
    finally:
        sys.settrace(None)
        shutil.rmtree(basetemp, ignore_errors=True)
    report = {"rc": rc, "failed": recorder.failed, "durations": recorder.durations}
    if trace:
        report["lines"] = {f: {str(line): sorted(ids) for line, ids in lines.items()} for f, lines in recorder.lines.items()}
    Path(result_file).write_text(json.dumps(report))
    os._exit(0)


@dataclass
class Running:
    pid: int
    result_file: str
    started: float
    timeout: float
    record: dict


def start(module, path, code, tests, timeout, record, trace=None) -> Running:
    handle, result_file = tempfile.mkstemp(prefix="mutant-", suffix=".json")
    os.close(handle)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            _child(module, path, code, tests, result_file, trace)
        finally:
            os._exit(70)
    return Running(pid, result_file, time.monotonic(), timeout, record)


def finish(run: Running, status: int | None) -> dict:
    """The record of a finished (status) or timed-out (None) child."""
    record = dict(run.record, seconds=round(time.monotonic() - run.started, 1))
    try:
        report = json.loads(Path(run.result_file).read_text() or "{}")
    except (OSError, ValueError):
        report = {}
    os.unlink(run.result_file)
    if status is None:
        record.update(status="killed", by="timeout")
    elif not report:
        record.update(status="killed", by=f"the test process died (status {status})")
    elif report["rc"] == 0:
        record.update(status="survived")
    elif report["rc"] in (1, 2, 3, 4):  # failed tests, a collection or conftest import error, a crash
        record.update(status="killed", by=report["failed"] or f"pytest exit {report['rc']}")
    else:
        record.update(status="error", by=f"pytest exit {report['rc']}")
    record["report"] = report
    return record


def wait_any(running: list[Running]) -> tuple[Running, int | None]:
    while True:
        for run in running:
            pid, status = os.waitpid(run.pid, os.WNOHANG)
            if pid:
                return run, status
            if time.monotonic() - run.started > run.timeout:
                os.killpg(run.pid, signal.SIGKILL)  # the child's own session: it and what its tests started
                os.waitpid(run.pid, 0)
                return run, None
        time.sleep(0.05)


def run_one(module, path, code, tests, timeout, trace=None) -> dict:
    run = start(module, path, code, tests, timeout, {}, trace)
    return finish(*wait_any([run]))


def preload(tests: list[str]) -> None:
    """Import what the tests import, and pytest's plugins, so each forked copy starts warm; then forget our own modules."""
    from importlib.metadata import entry_points

    for plugin in entry_points(group="pytest11"):
        plugin.load()
    sys.path.insert(0, str(REPO))
    for test in tests:
        name = test.removesuffix(".py").replace("/", ".")
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - a test module that fails to import fails its runs too
            print(f"preload: {name}: {error}", file=sys.stderr)
    _forget_own_modules()


def coverage(all_tests: list[str], files: list[str]) -> dict:
    """One traced run of every test: per target file, line -> the tests that execute it, and each test's duration."""
    report = run_one(None, None, None, all_tests, 3600, trace={str(REPO / f) for f in files})["report"]
    if report.get("rc") != 0:
        sys.exit(f"the tests fail without a mutant (first failure: {report.get('failed')}); fix them first")
    return report


def tests_for(site: Site, file: str, module_tests: list[str], cover: dict) -> list[str] | None:
    """The test ids of `module_tests` that execute `site`'s lines (fastest first); None: none does."""
    lines = cover["lines"][str(REPO / file)]
    ids: set[str] = set()
    for line in range(site.lines[0], site.lines[1] + 1):
        ids.update(lines.get(str(line), ()))
    if not ids:
        return None
    durations = cover["durations"]
    in_files = [t for t in durations if t.split("::")[0] in module_tests]
    if "<import>" in ids:
        chosen = in_files
    else:
        chosen = [t for t in in_files if t in ids]
    return sorted(chosen, key=lambda t: durations[t]) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results, one JSON line per mutant (appended; recorded ones skipped)")
    parser.add_argument("--module", action="append", choices=sorted(TARGETS), help="only these (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--report", type=Path, help="summarise a results file and exit")
    parser.add_argument("--equivalent", type=Path, default=Path(__file__).with_name("equivalent.json"))
    parser.add_argument("--sample", type=int, help="run only N mutants per module, drawn with a fixed seed (0)")
    parser.add_argument("--cover", type=Path, help="the traced run, reused when it exists (default: OUT.cover.json)")
    parser.add_argument("--retrace", action="store_true", help="trace the tests again (after adding tests)")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="drop the recorded survivors of these modules and run them again (after adding tests)")
    args = parser.parse_args()
    if args.report:
        report(args.report, args.equivalent)
        return
    modules = args.module or sorted(TARGETS)
    trees = {file: ast.parse((REPO / file).read_text(), file) for file in modules}
    sites = {file: find_sites(trees[file], TARGETS[file][2]) for file in modules}
    if args.list:
        for file in modules:
            for site in sites[file]:
                print(f"{file}:{site.line}: {site.key}")
        print(f"{sum(map(len, sites.values()))} mutants", file=sys.stderr)
        return
    if not args.out:
        parser.error("--out is required to run")
    done = set()
    if args.out.exists():
        records = [json.loads(line) for line in args.out.read_text().splitlines()]
        if args.rerun_survivors:
            kept = [r for r in records if not (r["module"] in modules and r["status"] == "survived")]
            args.out.write_text("".join(json.dumps(r) + "\n" for r in kept))
            print(f"rerunning {len(records) - len(kept)} survivors", file=sys.stderr)
            records = kept
        done = {(r["module"], r["n"]) for r in records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    targets = sorted(TARGETS)
    all_tests = sorted({t for file in targets for t in TARGETS[file][1]})
    preload(all_tests)
    cover_file = args.cover or args.out.with_name(args.out.name + ".cover.json")
    if cover_file.exists() and not args.retrace:
        cover = json.loads(cover_file.read_text())
    else:  # every target traced once (the same tests cover them all), kept for the next module's run
        cover = coverage(all_tests, targets)
        cover_file.write_text(json.dumps(cover))
    print(f"traced {len(cover['durations'])} tests", file=sys.stderr)
    if args.sample:
        import random

        for file in modules:
            if len(sites[file]) > args.sample:
                chosen = set(random.Random(0).sample(range(len(sites[file])), args.sample))
                done |= {(file, n) for n in range(len(sites[file])) if n not in chosen}

    queue = []
    for file in modules:
        name, module_tests, _ = TARGETS[file]
        for n, site in enumerate(sites[file]):
            if (file, n) in done:
                continue
            record = {"module": file, "n": n, **{k: v for k, v in asdict(site).items() if k != "path"}, "key": site.key}
            tests = tests_for(site, file, module_tests, cover)
            if tests is None:
                with args.out.open("a") as out:
                    out.write(json.dumps(dict(record, status="survived", by="no test executes it")) + "\n")
                continue
            try:
                code = compile(apply(trees[file], site), str(REPO / file), "exec")
            except (SyntaxError, ValueError, TypeError) as error:
                with args.out.open("a") as out:
                    out.write(json.dumps(dict(record, status="invalid", by=str(error))) + "\n")
                continue
            budget = sum(cover["durations"][t] for t in tests)
            queue.append((name, REPO / file, code, tests, 30 + 5 * budget, record))
    print(f"{len(queue)} mutants to run", file=sys.stderr)
    running: list[Running] = []
    total, finished = len(queue), 0
    while queue or running:
        while queue and len(running) < args.jobs:
            name, path, code, tests, timeout, record = queue.pop(0)
            running.append(start(name, path, code, tests, timeout, record))
        run, status = wait_any(running)
        running.remove(run)
        record = finish(run, status)
        record.pop("report", None)
        finished += 1
        with args.out.open("a") as out:
            out.write(json.dumps(record) + "\n")
        print(f"[{finished}/{total}] {record['status']:8} {record['module']}:{record['line']} {record['key']}",
              file=sys.stderr, flush=True)


def report(results: Path, equivalent_file: Path) -> None:
    """Per module: mutants, killed, survived, equivalent (by the equivalents file), score; then the survivors."""
    records = [json.loads(line) for line in results.read_text().splitlines()]
    equivalent = json.loads(equivalent_file.read_text()) if equivalent_file.exists() else {}
    rows, survivors, totals = [], [], [0, 0, 0, 0]
    for file in sorted({r["module"] for r in records}):
        sites = len(find_sites(ast.parse((REPO / file).read_text(), file), TARGETS[file][2]))
        mine = [r for r in records if r["module"] == file and r["status"] != "invalid"]
        killed = sum(r["status"] == "killed" for r in mine)
        surviving = [r for r in mine if r["status"] != "killed"]
        same = [r for r in surviving if equivalent.get(file, {}).get(r["key"])]
        counted = len(mine) - len(same)
        rows.append(f"| {file} | {sites} | {len(mine)} | {killed} | {len(surviving)} | {len(same)} | "
                    f"{100 * killed / len(mine):.1f}% | {100 * killed / max(counted, 1):.1f}% |")
        for i, value in enumerate((len(mine), killed, len(surviving), len(same))):
            totals[i] += value
        survivors += [(file, r) for r in surviving if r not in same]
    print("| module | sites | mutants run | killed | survived | of them equivalent | killed/all | killed/non-equivalent |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    mutants, killed, surviving, same = totals
    print(f"| **all** | | {mutants} | {killed} | {surviving} | {same} | {100 * killed / mutants:.1f}% | "
          f"{100 * killed / max(mutants - same, 1):.1f}% |")
    print(f"\n{len(survivors)} survivors not judged equivalent:")
    for file, r in survivors:
        print(f"  {file}:{r['line']}: {r['key']}" + (f"  [{r['by']}]" if r.get("by") else ""))


if __name__ == "__main__":
    main()

"""Automated mutation testing with mutmut: every mutant of the chosen modules, each module against only the fast
tests that execute it, one worker; a survivors report in work_dirs/mutation/report.md (`make mutation-auto`).

    python tools/mutation_auto.py src/difftune/data/captions.py src/difftune/storage/runlock.py
    python tools/mutation_auto.py --refresh-coverage src/difftune/data/scan.py   # re-measure which tests cover
    python tools/mutation_auto.py --retest src/difftune/data/scan.py   # the survivors again, with new tests
    python tools/mutation_auto.py --report-only src/difftune/data/scan.py   # the report from the last runs

1. Coverage selects the tests: the fast tests (`-m "not slow"`) run once under coverage, one context per test;
   a test covers a module when it runs a line inside one of the module's functions (mutmut mutates only those).
   The map is cached in work_dirs/mutation/tests_by_module.json (measured again with --refresh-coverage, or
   when it lacks a module asked for: after new tests, refresh it). Tests on the tiny models (slow) only fill
   the selection up to --min-tests.
2. Each module runs in its own copy of the repo (work_dirs/mutation/trees/<module>/, the tracked and new files),
   with the [tool.mutmut] settings of pyproject.toml plus `only_mutate` and the selected tests; mutmut writes
   its trampolined copy under that tree's mutants/, never into src/.
3. The report counts per module the mutants, killed, survived, timeout and the rest, with each survivor's diff.
   --retest runs only the mutants the last run missed, with tests/test_mutation_survivors.py added; the others
   keep their earlier outcome in the report.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORK = ROOT / "work_dirs" / "mutation"
COVERAGE_DATA = WORK / "coverage.sqlite"
COVERAGE_MAP = WORK / "tests_by_module.json"
MEASURED_TESTS = WORK / "measured_tests.json"  # every test the map has measured, covering or not
MODEL_TESTS = WORK / "tests_with_models.json"  # the tests that load the tiny models (the `assets` fixture): slow
REPORT = WORK / "report.md"
KEPT_OUTCOMES = "results-before-retest.json"  # in a module's tree: the outcomes of its runs before the last
SURVIVOR_TESTS = "tests/test_mutation_survivors*.py"  # the tests written for survivors (`--retest` adds them)
KILLED = {"killed", "caught by type check"}
UNCAUGHT = ("survived", "no tests")  # "no tests": no selected test runs the mutated function


# --- a pytest plugin (loaded with `-p mutation_auto` by coverage_map): one coverage context per test ---

_coverage = None


def pytest_configure(config) -> None:
    """Start coverage when the map is being measured (MUTATION_AUTO_COVERAGE names the data file)."""
    global _coverage
    if os.environ.get("MUTATION_AUTO_COVERAGE") and _coverage is None:
        import coverage

        _coverage = coverage.Coverage(data_file=os.environ["MUTATION_AUTO_COVERAGE"], source=["difftune"])
        _coverage.start()


def pytest_collection_modifyitems(session, config, items) -> None:
    """Note which tests use the tiny models (MUTATION_AUTO_MODELS names the file): the slow ones."""
    if os.environ.get("MUTATION_AUTO_MODELS"):
        heavy = [item.nodeid for item in items if "assets" in getattr(item, "fixturenames", ())]
        Path(os.environ["MUTATION_AUTO_MODELS"]).write_text(json.dumps(heavy, indent=1))


def pytest_runtest_protocol(item, nextitem) -> None:
    """Name the coverage context after the test about to run (its node id)."""
    if _coverage is not None:
        _coverage.switch_context(item.nodeid)


def pytest_unconfigure(config) -> None:
    if _coverage is not None:
        _coverage.stop()
        _coverage.save()


# --- which tests cover which module ---


def function_lines(path: Path) -> set[int]:
    """Line numbers of the statements inside the module's functions: what a test must run to cover a mutant."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for statement in node.body:
                lines.update(range(statement.lineno, (statement.end_lineno or statement.lineno) + 1))
    return lines


def coverage_map(modules: list[str], refresh: bool, now: set[str]) -> dict[str, list[str]]:
    """{module path: sorted node ids of the fast tests that run a line of its functions}, cached. Tests collected
    `now` but never measured (added since) are measured on their own and merged in; `refresh` measures them all."""
    cached = {} if refresh or not COVERAGE_MAP.is_file() else json.loads(COVERAGE_MAP.read_text())
    measured = set(json.loads(MEASURED_TESTS.read_text())) if cached and MEASURED_TESTS.is_file() else set()
    measured |= {test for tests in cached.values() for test in tests}
    new = sorted(now - measured)
    if cached and not new:
        return cached
    import coverage

    print(f"measuring which of {len(new)} fast tests cover which module (pytest under coverage) ...", flush=True)
    COVERAGE_DATA.unlink(missing_ok=True)
    heavy_now = WORK / "tests_with_models.new.json"
    env = {**os.environ, "MUTATION_AUTO_COVERAGE": str(COVERAGE_DATA), "MUTATION_AUTO_MODELS": str(heavy_now)}
    env["PYTHONPATH"] = str(ROOT / "tools")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "mutation_auto", "-p", "no:cacheprovider"]
    subprocess.run(command + (new if cached else []), cwd=ROOT, env=env, check=False, stdout=subprocess.DEVNULL)
    heavy = set(json.loads(MODEL_TESTS.read_text())) if cached and MODEL_TESTS.is_file() else set()
    MODEL_TESTS.write_text(json.dumps(sorted(heavy | set(json.loads(heavy_now.read_text()))), indent=1))
    data = coverage.CoverageData(basename=str(COVERAGE_DATA))
    data.read()
    tests_by_module = {module: [test for test in tests if test in now] for module, tests in cached.items()}
    for measured_file in data.measured_files():
        path = Path(measured_file).resolve()
        if not path.is_relative_to(ROOT / "src") or not path.is_file():  # (a file moved since)
            continue
        inside = function_lines(path)
        contexts = data.contexts_by_lineno(measured_file)
        tests = {test for line in inside for test in contexts.get(line, []) if test}
        module = str(path.relative_to(ROOT))
        tests_by_module[module] = sorted(set(tests_by_module.get(module, [])) | tests)
    COVERAGE_MAP.write_text(json.dumps(tests_by_module, indent=1, sort_keys=True))
    MEASURED_TESTS.write_text(json.dumps(sorted(measured | set(new)), indent=1))
    return tests_by_module


def collected_tests() -> set[str]:
    """The node ids of the fast tests as they are now (a test renamed since the map was measured drops out)."""
    command = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "not slow", "-p", "no:cacheprovider"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    return {line for line in out.stdout.splitlines() if "::" in line}


def select_tests(module: str, tests_by_module: dict[str, list[str]], min_tests: int, now: set[str]) -> list[str]:
    """The module's covering tests (of those collected `now`) without models; if they are fewer than `min_tests`,
    tests with the tiny models (seconds each; the most focused first: those covering the fewest modules) up to it."""
    heavy = set(json.loads(MODEL_TESTS.read_text())) if MODEL_TESTS.is_file() else set()
    reach = Counter(test for tests in tests_by_module.values() for test in tests)
    covering = [test for test in tests_by_module.get(module, []) if test in now]
    light = [test for test in covering if test not in heavy]
    slow = sorted((test for test in covering if test in heavy), key=lambda test: (reach[test], test))
    return light + slow[: max(0, min_tests - len(light))]


# --- one module's mutmut run ---


def repo_files() -> list[str]:
    """The tracked files and the new ones not ignored: what a copy of the repo needs."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return [name for name in out.stdout.splitlines() if (ROOT / name).is_file()]


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


def tree_of(module: str) -> Path:
    return WORK / "trees" / module.removeprefix("src/difftune/").replace("/", "_").removesuffix(".py")


def copy_files(tree: Path, names: list[str]) -> None:
    for name in names:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)


def configure(tree: Path, module: str, tests: list[str]) -> None:
    """The repo's pyproject.toml in the tree, with `only_mutate` and the selected tests added to [tool.mutmut]."""
    text = (ROOT / "pyproject.toml").read_text()
    marker = "[tool.mutmut]\n"
    assert marker in text, "pyproject.toml has no [tool.mutmut] section"
    extra = f"only_mutate = {toml_list([module])}\npytest_add_cli_args_test_selection = {toml_list(tests)}\n"
    (tree / "pyproject.toml").write_text(text.replace(marker, marker + extra))


def prepare_tree(module: str, tests: list[str]) -> Path:
    """A fresh copy of the repo, configured for `module` and its tests."""
    tree = tree_of(module)
    shutil.rmtree(tree, ignore_errors=True)
    copy_files(tree, repo_files())
    configure(tree, module, tests)
    return tree


def selected_tests(tree: Path) -> list[str]:
    """The tests `configure` wrote into the tree's pyproject.toml (one line, a JSON list)."""
    key = "pytest_add_cli_args_test_selection = "
    line = next(line for line in (tree / "pyproject.toml").read_text().splitlines() if line.startswith(key))
    return json.loads(line.removeprefix(key))


def outcomes(tree: Path, module: str) -> dict[str, str]:
    """Each mutant's last known outcome: the last run's, over those kept from earlier runs (mutmut forgets earlier
    outcomes once the selection changes, "not checked"); "not checked" left means never run."""
    kept = tree / KEPT_OUTCOMES
    last = results(tree, module)
    earlier = json.loads(kept.read_text()) if kept.is_file() else {}
    return last | earlier | {name: status for name, status in last.items() if status != "not checked"}


def prepare_retest(module: str, survivor_tests: tuple[str, ...]) -> tuple[Path, list[str], list[str]]:
    """The module's tree of the last run with today's tests copied in and `survivor_tests` (globs) added to its
    selection, and the mutants it did not catch or never ran: (tree, tests, mutant names to run again)."""
    tree = tree_of(module)
    known = outcomes(tree, module)
    checked = {name: status for name, status in known.items() if status != "not checked"}
    (tree / KEPT_OUTCOMES).write_text(json.dumps(checked, indent=1))
    again = [name for name, status in known.items() if status in UNCAUGHT or status == "not checked"]
    copy_files(tree, [name for name in repo_files() if name.startswith("tests/")])
    tests = selected_tests(tree)
    added = {str(test.relative_to(ROOT)) for pattern in survivor_tests for test in ROOT.glob(pattern)}
    tests += sorted(added - set(tests))
    configure(tree, module, tests)
    return tree, tests, again


def run_mutmut(tree: Path, assets: Path, log: Path, names: list[str]) -> float:
    """`mutmut run` with one worker in the tree (only the mutants `names`, if any); the mutated package first on
    the path of every process."""
    mutated = tree / "mutants" / "src"
    mutated.mkdir(parents=True, exist_ok=True)  # made now: a path that is missing at start-up stays unsearched
    env = {**os.environ, "PYTHONPATH": str(mutated), "HF_HUB_OFFLINE": "1"}
    env["DIFFTUNE_TEST_ASSETS"] = str(assets)
    start = time.monotonic()
    with log.open("w") as out:
        command = [str(BIN / "mutmut"), "run", "--max-children", "1", *names]
        subprocess.run(command, cwd=tree, env=env, stdout=out, stderr=out)
    return time.monotonic() - start


def results(tree: Path, module: str) -> dict[str, str]:
    """{mutant name: mutmut's status} from the run's .meta file (empty when the run did not get that far)."""
    from mutmut.stats import status_by_exit_code

    meta = tree / "mutants" / (module + ".meta")
    if not meta.is_file():
        return {}
    exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in sorted(exit_codes.items())}


def diffs(tree: Path, names: list[str]) -> dict[str, str]:
    """{mutant name: its diff}, as `mutmut show` prints it (one process for them all, in the tree)."""
    script = "import json, sys; from mutmut.mutation.diff_apply import get_diff_for_mutant as diff; "
    script += "print(json.dumps({name: diff(name) for name in sys.argv[1:]}))"
    out = subprocess.run([sys.executable, "-c", script, *names], cwd=tree, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else dict.fromkeys(names, out.stderr.strip()[-500:])


# --- the report ---


HEADER = "| module | mutants | killed | survived | no tests | timeout | other |\n|---|---|---|---|---|---|---|"


def summary_row(module: str, statuses: dict[str, str]) -> str:
    """One table row: the mutants and how many of each outcome (killed includes those the type check caught)."""
    counts = Counter("killed" if status in KILLED else status for status in statuses.values())
    main = ("killed", *UNCAUGHT, "timeout")
    others = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s not in main) or "-"
    return f"| {module} | {len(statuses)} | " + " | ".join(str(counts[s]) for s in main) + f" | {others} |"


def report_section(module: str, tests: int, seconds: float, statuses: dict[str, str], tree: Path) -> str:
    """The module's counts and the diff of every mutant that no test caught."""
    lines = [f"## {module}", "", f"{tests} tests selected; {seconds / 60:.1f} min.", ""]
    lines += [HEADER, summary_row(module, statuses), ""]
    if not statuses:
        lines += [f"No results: see {tree.relative_to(ROOT)}/mutmut.log.", ""]
    uncaught = [name for name, status in statuses.items() if status in UNCAUGHT]
    for name, text in diffs(tree, uncaught).items() if uncaught else ():
        lines += [f"### {name} ({statuses[name]})", "", "```diff", text, "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="+", help="Source files to mutate, e.g. src/difftune/data/captions.py.")
    parser.add_argument("--refresh-coverage", action="store_true", help="Measure the test map again.")
    parser.add_argument("--min-tests", type=int, default=10, help="Tiny-model tests fill the selection up to this.")
    parser.add_argument("--retest", action="store_true", help=f"The last run's survivors again, with {SURVIVOR_TESTS}.")
    parser.add_argument("--report-only", action="store_true", help="Only write the report from the last runs.")
    parser.add_argument(
        "--with-tests", action="append", help=f"The test files --retest adds (a glob, repeatable; {SURVIVOR_TESTS})."
    )
    parser.add_argument("--report", type=Path, default=REPORT, help="Where to write the report.")
    parser.add_argument("--assets", type=Path, help="Tiny assets to reuse (default: built once under work_dirs/).")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)

    first_run = not (args.retest or args.report_only)  # the others take the tests their tree already has
    now = collected_tests() if first_run else set()
    tests_by_module = coverage_map(args.modules, args.refresh_coverage, now) if first_run else {}
    assets = args.assets or WORK / "assets"
    if not (assets / ".done").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_assets.py"), str(assets)], check=True)
        (assets / ".done").touch()

    sections, rows = [], []
    for module in args.modules:
        if args.report_only:
            tree, names = tree_of(module), []
            tests = selected_tests(tree)
        elif args.retest:
            tree, tests, names = prepare_retest(module, tuple(args.with_tests or [SURVIVOR_TESTS]))
        else:
            tests, names = select_tests(module, tests_by_module, args.min_tests, now), []
            tree = prepare_tree(module, tests)
        covering = f" of {len(tests_by_module[module])} covering" if module in tests_by_module else ""
        print(f"{module}: {len(tests)}{covering} tests", flush=True)
        log = tree / ("mutmut-retest.log" if args.retest else "mutmut.log")
        run = tests and not args.report_only and (names or not args.retest)
        seconds = run_mutmut(tree, assets.resolve(), log, names) if run else 0.0
        statuses = outcomes(tree, module)
        sections.append(report_section(module, len(tests), seconds, statuses, tree))
        rows.append(summary_row(module, statuses))
        print(rows[-1], flush=True)
        args.report.write_text("\n".join(["# Mutation survivors (mutmut)", "", HEADER, *rows, "", *sections]))
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

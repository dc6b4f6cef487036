"""Classroom assignments: nbgrader student versions and autograding, made from the course notebooks themselves.

Chapters 01-08 carry their graded exercises in nbgrader's own format (see the README, "For teachers"): a solution
cell (`solution: true`) whose function body sits between `### BEGIN SOLUTION` / `### END SOLUTION`, and a test cell
(`grade: true`, `points`) with extra cases between `### BEGIN HIDDEN TESTS` / `### END HIDDEN TESTS`. There is no
second copy of the course: the solution notebooks ARE the course, and nbgrader blanks them.

    python -m frcnn_tutorial.assignments check     [--notebooks notebooks]        # static checks, no nbgrader needed
    python -m frcnn_tutorial.assignments table     [--notebooks notebooks]        # Markdown table for the README
    python -m frcnn_tutorial.assignments build     [--course build/course] [--only 01 03]
    python -m frcnn_tutorial.assignments autograde ASSIGNMENT [--course build/course] [--student ID] [--json FILE]
    python -m frcnn_tutorial.assignments scores    [--course build/course] [--json FILE]
    python -m frcnn_tutorial.assignments selftest  [--course build/selftest] [--only 01] [--json FILE]

`build`, `autograde`, `scores` and `selftest` need nbgrader, which lives in its own environment (`make classroom`
creates `.venv-classroom`; `make assignments` runs `build` there) so that the everyday `.venv` does not get
nbgrader's JupyterLab extensions. `check` and `table` run anywhere.

`selftest` grades three made-up submissions of each chapter in a throw-away course: the solution notebook as it is
(must get full points), the student version as released (must get zero and not crash), and the student version
filled with the reference answers except one made wrong on purpose (must lose exactly that exercise's points).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from frcnn_tutorial.series import GRADED_CHAPTERS, nbgrader_meta, notebook_paths, notebook_title

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
COURSE_DIR = ROOT / "build" / "course"
SELFTEST_DIR = ROOT / "build" / "selftest"
COURSE_ID = "frcnn-tutorial"
CELL_TIMEOUT = 900  # seconds per cell when nbgrader executes a notebook
SETUP_HINT = "run `make classroom` (it creates .venv-classroom with nbgrader)"

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
NBGRADER_MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")  # its defaults
CALL = re.compile(r"\b(exercise_\w+)\s*\(")

CONFIG_TEMPLATE = '''\
# nbgrader configuration of the {course_id} course. Written by `make assignments`
# (python -m frcnn_tutorial.assignments build): edit the course in notebooks/, not here.
import os

c = get_config()  # noqa: F821 (nbgrader provides it)
c.CourseDirectory.course_id = "{course_id}"
c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
# autograde executes every submitted notebook from top to bottom; the chapters train small models
c.Execute.timeout = {timeout}
# the small budgets of the test suite (about a minute a chapter); FRCNN_PROFILE=full grades with the full ones
os.environ.setdefault("FRCNN_PROFILE", "ci")
'''


# ---------------------------------------------------------------- reading the graded cells (no nbgrader needed)

@dataclass
class Exercise:
    """One graded exercise: a solution cell (the function to write) and the test cell that grades it."""

    chapter: str
    notebook: str
    grade_id: str
    function: str
    test_id: str
    points: float
    task: str


@dataclass
class ChapterReport:
    notebook: str
    title: str
    exercises: list[Exercise] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def points(self) -> float:
        return sum(e.points for e in self.exercises)


def chapter_paths(notebook_dir: Path = NOTEBOOK_DIR, only: list[str] | None = None) -> list[Path]:
    """The notebooks of chapters 01-08 that exist, in order (optionally only the numbers in `only`)."""
    wanted = [n for n in GRADED_CHAPTERS if not only or n in only]
    return [p for p in notebook_paths(Path(notebook_dir)) if p.name[:2] in wanted]


def is_solution(cell) -> bool:
    return cell.cell_type == "code" and bool(nbgrader_meta(cell).get("solution")) and not nbgrader_meta(cell).get(
        "grade")


def is_test(cell) -> bool:
    return cell.cell_type == "code" and bool(nbgrader_meta(cell).get("grade"))


def defined_functions(source: str) -> list[str]:
    """Top-level function names a cell defines (empty if it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _region(source: str, begin: str, end: str) -> tuple[list[str], list[str]]:
    """(lines inside begin..end regions, lines outside them), markers excluded."""
    inside, outside, depth = [], [], False
    for line in source.splitlines():
        if line.strip() == begin:
            depth = True
        elif line.strip() == end:
            depth = False
        else:
            (inside if depth else outside).append(line)
    return inside, outside


def _task_line(cells, index: int, function: str = "") -> str:
    """What an exercise asks, in a few words, from the Markdown cell that states it: the closest one above its
    solution cell that names the function (else the one right above). Its bold "**Exercise N (graded): title.**"
    phrase, else its last heading, else its first line; without the "Exercise N (graded):" prefix."""
    above = [c for c in reversed(cells[:index]) if c.cell_type == "markdown"]
    cell = next((c for c in above if function and function in c.source), None)
    if cell is None:
        previous = cells[index - 1] if index > 0 else None
        cell = previous if previous is not None and previous.cell_type == "markdown" else None
    if cell is None:
        return ""
    lines = [line.strip() for line in cell.source.splitlines() if line.strip()]
    bold = re.search(r"\*\*(Exercise[^*]*)\*\*", cell.source)
    headings = [line.lstrip("#").strip() for line in lines if line.startswith("#")]
    headings = [h for h in headings if h not in ("Exercises", "Summary")]
    text = bold.group(1) if bold else headings[-1] if headings else (lines[0] if lines else "")
    text = re.sub(r"^Exercise\s*\d*\s*(\((graded|ungraded)\))?\s*[:.]\s*", "", text, flags=re.I)
    return text.strip().rstrip(".").replace("|", "\\|")


def inspect_chapter(path: Path) -> ChapterReport:
    """The graded exercises of one chapter and everything that would break nbgrader or the grading."""
    nb = nbformat.read(path, as_version=4)
    report = ChapterReport(path.name, notebook_title(nb, ""))
    problems = report.problems
    cells = nb.cells
    ids: dict[str, int] = {}
    solutions: dict[str, tuple[int, str]] = {}  # function -> (cell index, grade_id)
    for i, cell in enumerate(cells):  # nbgrader looks for its markers as plain substrings, in every cell
        for marker in NBGRADER_MARKERS:
            if marker in cell.source and not (is_test(cell) if "HIDDEN" in marker else is_solution(cell)):
                kind = "graded test" if "HIDDEN" in marker else "solution"
                problems.append(f"cell {i} ({cell.cell_type}): contains {marker!r} but is not a {kind} cell; "
                                "nbgrader matches that text anywhere (prose too) and fails or drops the line: "
                                "reword it")
    for i, cell in enumerate(cells):
        meta = nbgrader_meta(cell)
        if not meta:
            continue
        gid = meta.get("grade_id")
        where = f"cell {i} ({gid or 'no grade_id'})"
        if not gid:
            problems.append(f"{where}: nbgrader metadata without a grade_id")
            continue
        if gid in ids:
            problems.append(f"{where}: grade_id also used by cell {ids[gid]}; nbgrader needs unique ids")
        ids[gid] = i
        if meta.get("schema_version") != 3:
            problems.append(f"{where}: nbgrader schema_version must be 3")
        if is_solution(cell):
            if BEGIN_SOLUTION not in cell.source or END_SOLUTION not in cell.source:
                problems.append(f"{where}: solution cell without {BEGIN_SOLUTION} / {END_SOLUTION}")
            elif not re.search(r"^[ \t]+### BEGIN SOLUTION", cell.source, re.M):
                problems.append(f"{where}: {BEGIN_SOLUTION} is not indented inside a function body")
            if meta.get("locked"):
                problems.append(f"{where}: a solution cell must not be locked")
            names = [n for n in defined_functions(cell.source) if n.startswith("exercise_")]
            if len(names) != 1:
                problems.append(f"{where}: a solution cell defines one `exercise_*` function, found {names}")
            for name in names:
                solutions[name] = (i, gid)
        elif is_test(cell):
            if not meta.get("locked"):
                problems.append(f"{where}: a graded test cell must be locked")
            points = meta.get("points")
            if not isinstance(points, (int, float)) or not 1 <= points <= 3:
                problems.append(f"{where}: points must be 1-3, got {points!r}")
            if BEGIN_HIDDEN not in cell.source or END_HIDDEN not in cell.source:
                problems.append(f"{where}: graded test cell without {BEGIN_HIDDEN} / {END_HIDDEN}")
            if "frcnn_tutorial.grading" not in cell.source and "check_" not in cell.source:
                problems.append(f"{where}: uses no frcnn_tutorial.grading check (students need expected vs got)")
    for i, cell in enumerate(cells):
        if not is_test(cell):
            continue
        meta = nbgrader_meta(cell)
        called = [n for n in dict.fromkeys(CALL.findall(cell.source)) if n in solutions]
        if not called:
            problems.append(f"cell {i} ({meta.get('grade_id')}): graded test calls no exercise function")
            continue
        if len(called) > 1:
            problems.append(f"cell {i} ({meta.get('grade_id')}): grades several exercises {called}; "
                            "one wrong answer would then cost more than its own points")
        index, gid = solutions[called[0]]
        report.exercises.append(Exercise(path.name[:2], path.name, gid, called[0], meta.get("grade_id"),
                                         float(meta.get("points") or 0), _task_line(cells, index, called[0])))
    graded = {e.function: e for e in report.exercises}
    for name, (index, gid) in solutions.items():
        if name not in graded:
            problems.append(f"cell {index} ({gid}): `{name}` has no graded test cell")
    for i, cell in enumerate(cells):  # nothing but its own test may call an exercise: the student copy raises
        if cell.cell_type != "code" or is_solution(cell):
            continue
        own = {e.function for e in report.exercises if e.test_id == nbgrader_meta(cell).get("grade_id")}
        for name in set(CALL.findall(cell.source)) & (set(solutions) - own):
            problems.append(f"cell {i}: calls `{name}` outside its test cell (it raises NotImplementedError in "
                            "the student version)")
    return report


def inspect_course(notebook_dir: Path = NOTEBOOK_DIR, only: list[str] | None = None) -> list[ChapterReport]:
    return [inspect_chapter(p) for p in chapter_paths(notebook_dir, only)]


def markdown_table(reports: list[ChapterReport]) -> str:
    """What each assignment covers and its points: the table of the README's "For teachers" section."""
    rows = ["| chapter | graded exercise | function | points |", "|---|---|---|---|"]
    for report in reports:
        for k, ex in enumerate(report.exercises):
            chapter = f"{report.title or report.notebook}" if k == 0 else ""
            rows.append(f"| {chapter} | {ex.task} | `{ex.function}` | {ex.points:g} |")
        rows.append(f"| | **{report.notebook[:2]} total** | | **{report.points:g}** |")
    total = sum(r.points for r in reports)
    count = sum(len(r.exercises) for r in reports)
    rows.append(f"| | **{count} graded exercises in {len(reports)} assignments** | | **{total:g}** |")
    return "\n".join(rows)


# ---------------------------------------------------------------- leak check (student version vs solution)

def _code(nb) -> list[str]:
    return [c.source for c in nb.cells]


def leaks(source_nb, release_nb) -> list[str]:
    """Solution code or hidden tests of `source_nb` that survive in the student version `release_nb`.

    A line counts as secret when it appears in a solution or hidden-test region of the source and nowhere else in
    the source (so a line like `import torch` that the teaching cells use too is not a false alarm)."""
    secret, public = set(), set()
    for src in _code(source_nb):
        sol_in, sol_out = _region(src, BEGIN_SOLUTION, END_SOLUTION)
        hid_in, rest = _region("\n".join(sol_out), BEGIN_HIDDEN, END_HIDDEN)
        secret.update(line.strip() for line in sol_in + hid_in)
        public.update(line.strip() for line in rest)
    secret = {s for s in secret - public if s and not s.startswith("#")}
    found = []
    for i, src in enumerate(_code(release_nb)):
        for marker in (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN, END_HIDDEN):
            if marker in src:
                found.append(f"cell {i}: marker {marker!r}")
        for line in src.splitlines():
            if line.strip() in secret:
                found.append(f"cell {i}: {line.strip()!r}")
    return found


# ---------------------------------------------------------------- nbgrader (needs the [classroom] extra)

def require_nbgrader() -> None:
    try:
        import nbgrader  # noqa: F401
    except ImportError:
        raise SystemExit(f"nbgrader is not installed for {sys.executable}: {SETUP_HINT}, then use "
                         ".venv-classroom/bin/python -m frcnn_tutorial.assignments ...") from None


def nbgrader(course: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run the real `nbgrader` command line in the course directory."""
    cmd = [sys.executable, "-m", "nbgrader", *args]
    bin_dir = str(Path(sys.executable).parent)  # nbgrader runs `alembic` (its database migrations) from PATH
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(cmd, cwd=course, capture_output=True, text=True, timeout=timeout, env=env)


def write_config(course: Path) -> Path:
    course.mkdir(parents=True, exist_ok=True)
    config = course / "nbgrader_config.py"
    config.write_text(CONFIG_TEMPLATE.format(course_id=COURSE_ID, timeout=CELL_TIMEOUT))
    return config


@dataclass
class BuildResult:
    assignment: str
    ok: bool
    seconds: float
    exercises: int
    points: float
    error: str = ""


def build(course: Path = COURSE_DIR, notebook_dir: Path = NOTEBOOK_DIR, only: list[str] | None = None,
          log=print) -> list[BuildResult]:
    """course/nbgrader_config.py, course/source/<chapter>/<chapter>.ipynb, then `nbgrader generate_assignment`
    into course/release/<chapter>/ for every chapter 01-08 that exists; checks each release for leaks.

    One nbgrader run generates all the chapters (an assignment pattern such as `0[1-8]_*`): nbgrader takes seconds
    to start, and it reports each assignment that fails, so one broken chapter does not stop the others."""
    require_nbgrader()
    course = Path(course).resolve()
    write_config(course)
    chapters = chapter_paths(notebook_dir, only)
    reports = {p.stem: inspect_chapter(p) for p in chapters}
    todo = [p for p in chapters if reports[p.stem].exercises]
    for path in todo:
        source = course / "source" / path.stem
        source.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, source / path.name)
        stale = course / "release" / path.stem / path.name
        if stale.exists():
            stale.unlink()
    start = time.perf_counter()
    log_text = ""
    if todo:
        pattern = todo[0].stem if len(todo) == 1 else "0[" + "".join(sorted({p.name[1] for p in todo})) + "]_*"
        proc = nbgrader(course, "generate_assignment", pattern, "--force")
        log_text = proc.stdout + proc.stderr
    seconds = time.perf_counter() - start
    results = []
    for path in chapters:
        name, report = path.stem, reports[path.stem]
        released = course / "release" / name / path.name
        error = "; ".join(report.problems)
        if not report.exercises:
            error = error or "no graded exercises"
        elif not released.exists() or f"error processing assignment '{name}'" in log_text:
            error = "; ".join(filter(None, [error, "nbgrader generate_assignment: " + _nbgrader_error(log_text, name)]))
        else:
            leaked = leaks(nbformat.read(path, as_version=4), nbformat.read(released, as_version=4))
            if leaked:
                error = "student version leaks: " + "; ".join(leaked[:5])
        result = BuildResult(name, not error, seconds / max(len(todo), 1), len(report.exercises), report.points, error)
        results.append(result)
        log(f"{name:40s} {len(report.exercises):2d} exercises {report.points:4g} points  "
            + ("ok" if result.ok else f"FAILED: {error}"))
    log(f"nbgrader generate_assignment: {len(todo)} assignments in {seconds:.0f} s")
    return results


def _nbgrader_error(log_text: str, name: str) -> str:
    """nbgrader's own message for the assignment `name` (the ERROR line logged just before it names the folder)."""
    last = ""
    for line in log_text.splitlines():
        if "| ERROR]" not in line:
            continue
        message = line.split("| ERROR]", 1)[1].strip()
        if "error processing assignment" in message and f"/{name}" in message:
            return last or message
        if not message.startswith(("There was an error", "Please see", "Traceback")):
            last = message
    return _tail(log_text, 5) or "no student version written"


def _tail(text: str, n: int = 15) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def autograde(course: Path, assignment: str, student: str | None = None) -> subprocess.CompletedProcess:
    """`nbgrader autograde` over course/submitted/<student>/<assignment>/ (every student unless one is named)."""
    require_nbgrader()
    args = ["autograde", assignment, "--force"] + ([f"--student={student}"] if student else [])
    return nbgrader(Path(course).resolve(), *args)


def scores(course: Path = COURSE_DIR) -> dict:
    """{assignment: {student: {grade_id: [score, max_score]}}} read from the course's gradebook."""
    require_nbgrader()
    from nbgrader.api import Gradebook

    course = Path(course).resolve()
    out: dict = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for assignment in gb.assignments:
            for notebook in assignment.notebooks:
                for sub in gb.notebook_submissions(notebook.name, assignment.name):
                    cells = out.setdefault(assignment.name, {}).setdefault(sub.student.id, {})
                    for grade in sub.grades:
                        cells[grade.name] = [float(grade.score), float(grade.max_score)]
    return out


def errored_cells(nb, allowed_ids=()) -> list[tuple[int, str]]:
    """(index, exception name) of the code cells that raised, except the graded cells named in `allowed_ids`."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or nbgrader_meta(cell).get("grade_id") in allowed_ids:
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append((i, output.get("ename", "?")))
    return found


# ---------------------------------------------------------------- made-up submissions for the self-test

_WRONG = '''

def {name}(*args, **kwargs):  # selftest: the reference answer, made wrong on purpose
    def off(value):
        import torch
        if isinstance(value, torch.Tensor):
            return ~value if value.dtype == torch.bool else value + 1
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value + 1
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(off(v) for v in value))
        if isinstance(value, (tuple, list)):
            return type(value)(off(v) for v in value)
        if isinstance(value, dict):
            return {{k: off(v) for k, v in value.items()}}
        return value
    return off(_right_{name}(*args, **kwargs))
'''


def answered(source: str) -> str:
    """A solution cell as a student who wrote the reference answer would hand it in (markers gone)."""
    return "\n".join(line for line in source.splitlines() if line.strip() not in (BEGIN_SOLUTION, END_SOLUTION))


def wrong(source: str, function: str) -> str:
    """The reference answer, but every number it returns off by one (booleans flipped)."""
    renamed = re.sub(rf"\bdef {function}\s*\(", f"def _right_{function}(", answered(source), count=1)
    return renamed + _WRONG.format(name=function)


def filled_submission(source_nb, release_nb, wrong_function: str | None = None):
    """The student version with every solution cell answered by the reference, one of them wrong if asked."""
    by_id = {nbgrader_meta(c).get("grade_id"): c for c in source_nb.cells if is_solution(c)}
    nb = nbformat.from_dict(json.loads(json.dumps(release_nb)))
    for cell in nb.cells:
        if is_solution(cell):
            src = by_id[nbgrader_meta(cell)["grade_id"]].source
            names = [n for n in defined_functions(src) if n.startswith("exercise_")]
            cell.source = wrong(src, wrong_function) if wrong_function in names else answered(src)
    return nb


def selftest(course: Path = SELFTEST_DIR, notebook_dir: Path = NOTEBOOK_DIR, only: list[str] | None = None,
             wrong_grade_id: str | None = None, log=print) -> dict:
    """Build a throw-away course, submit three made-up students per chapter, autograde, compare the scores.

    Students: `solution` (the course notebook untouched: full points), `blank` (the student version untouched:
    zero on every graded test, no crash), `wrong` (the student version answered with the reference except one
    exercise, made wrong: loses exactly that exercise's points). Returns the findings per chapter."""
    require_nbgrader()
    course = Path(course).resolve()
    if course.exists():
        shutil.rmtree(course)
    built = build(course, notebook_dir, only, log=log)
    findings: dict = {}
    for result in built:
        name = result.assignment
        entry = findings[name] = {"build_ok": result.ok, "build_seconds": round(result.seconds, 1),
                                  "errors": [] if result.ok else [result.error]}
        if not result.ok:
            continue
        src_path = course / "source" / name / f"{name}.ipynb"
        source_nb = nbformat.read(src_path, as_version=4)
        release_nb = nbformat.read(course / "release" / name / f"{name}.ipynb", as_version=4)
        exercises = inspect_chapter(src_path).exercises
        target = next((e for e in exercises if e.grade_id == wrong_grade_id), exercises[0])
        submissions = {"solution": source_nb, "blank": release_nb,
                       "wrong": filled_submission(source_nb, release_nb, target.function)}
        for student, nb in submissions.items():
            folder = course / "submitted" / student / name
            folder.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, folder / f"{name}.ipynb")
        start = time.perf_counter()
        proc = autograde(course, name)
        entry["autograde_seconds"] = round(time.perf_counter() - start, 1)
        entry["wrong_exercise"] = target.test_id
        got = scores(course).get(name, {})
        entry["scores"] = got
        if proc.returncode != 0:
            entry["errors"].append("nbgrader autograde failed: " + _tail(proc.stdout + proc.stderr))
        tests = {e.test_id: e.points for e in exercises}
        for student in submissions:
            if student not in got:
                entry["errors"].append(f"{student}: no grades in the gradebook (autograde crashed?)")
        expected = {"solution": dict(tests), "blank": dict.fromkeys(tests, 0.0),
                    "wrong": {t: (0.0 if t == target.test_id else p) for t, p in tests.items()}}
        for student, want in expected.items():
            have = {gid: s for gid, (s, _) in got.get(student, {}).items() if gid in tests}
            if student in got and have != want:
                diff = {gid: (have.get(gid), want[gid]) for gid in want if have.get(gid) != want[gid]}
                entry["errors"].append(f"{student}: (got, expected) points {diff}")
        allowed = {"solution": set(), "blank": set(tests), "wrong": {target.test_id}}
        for student, ok_ids in allowed.items():  # a cell that errors where it should not: the notebook is broken
            graded = course / "autograded" / student / name / f"{name}.ipynb"
            if graded.exists():
                for i, ename in errored_cells(nbformat.read(graded, as_version=4), ok_ids):
                    entry["errors"].append(f"{student}: cell {i} raised {ename} when nbgrader ran it")
        entry["ok"] = not entry["errors"]
        log(f"{name:40s} autograde {entry['autograde_seconds']:5.1f} s  "
            + ("ok" if entry["ok"] else "FAILED: " + " | ".join(entry["errors"])))
    return findings


# ---------------------------------------------------------------- the classroom environment (`make classroom`)

CLASSROOM_ENV = ROOT / ".venv-classroom"


def classroom_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The `[classroom]` extra of pyproject.toml (the one place its packages are named)."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover (Python 3.10)
        import tomli as tomllib
    return tomllib.loads(Path(pyproject).read_text())["project"]["optional-dependencies"]["classroom"]


def make_classroom_env(target: Path = CLASSROOM_ENV, log=print) -> Path:
    """A venv for nbgrader that reuses the running environment's packages (torch included) instead of copying them.

    Run with the course's own interpreter (`.venv/bin/python -m frcnn_tutorial.assignments env`). The new venv gets
    a .pth file that adds this interpreter's site-packages after its own (so `import torch, frcnn_tutorial` work and
    pip counts them as installed), then pip installs only what the `[classroom]` extra adds (nbgrader and the few
    packages it needs that are missing). nbgrader's JupyterLab and server extensions land in the new venv's
    share/ and etc/, which the course's JupyterLab (`make lab`) never reads. A `python3` kernelspec pointing at the
    new interpreter makes the kernels nbgrader starts see the same packages."""
    import sysconfig
    import venv

    target = Path(target).resolve()
    if target.exists():
        shutil.rmtree(target)
    start = time.perf_counter()
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(target)
    (target / ".gitignore").write_text("*\n")  # never committed, whatever the repository's .gitignore says
    python = target / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    Path(purelib, "_frcnn_tutorial_course_env.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    requirements = classroom_requirements()
    log(f"{target}: reuses {here}; installing {' '.join(requirements)}")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
                   check=True)
    subprocess.run([str(python), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3",
                    "--display-name", "Python 3 (ipykernel)"], check=True, capture_output=True)
    probe = "import nbgrader, torch, frcnn_tutorial; print(nbgrader.__version__, torch.__version__)"
    versions = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    log(f"{target}: nbgrader {versions[0]}, torch {versions[1]}, in {time.perf_counter() - start:.0f} s")
    return python


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frcnn_tutorial.assignments", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "table", "build", "selftest"):
        p = sub.add_parser(name)
        p.add_argument("--notebooks", type=Path, default=NOTEBOOK_DIR)
        p.add_argument("--only", nargs="*", help="chapter numbers, e.g. 01 03")
        if name in ("build", "selftest"):
            p.add_argument("--course", type=Path, default=COURSE_DIR if name == "build" else SELFTEST_DIR)
        if name == "selftest":
            p.add_argument("--wrong", help="grade_id of the exercise to answer wrongly (default: the first)")
            p.add_argument("--json", type=Path)
    p = sub.add_parser("autograde")
    p.add_argument("assignment")
    p.add_argument("--course", type=Path, default=COURSE_DIR)
    p.add_argument("--student")
    p.add_argument("--json", type=Path)
    p = sub.add_parser("env", help="create the nbgrader environment (run with .venv/bin/python)")
    p.add_argument("target", type=Path, nargs="?", default=CLASSROOM_ENV)
    p = sub.add_parser("scores")
    p.add_argument("--course", type=Path, default=COURSE_DIR)
    p.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    if args.command == "check":
        reports = inspect_course(args.notebooks, args.only)
        for r in reports:
            print(f"{r.notebook:40s} {len(r.exercises):2d} graded exercises, {r.points:g} points")
            for problem in r.problems:
                print(f"    PROBLEM {problem}")
        total = sum(len(r.exercises) for r in reports)
        print(f"{total} graded exercises in {len(reports)} chapters")
        return 1 if any(r.problems for r in reports) else 0
    if args.command == "env":
        make_classroom_env(args.target)
        return 0
    if args.command == "table":
        print(markdown_table(inspect_course(args.notebooks, args.only)))
        return 0
    if args.command == "build":
        start = time.perf_counter()
        results = build(args.course, args.notebooks, args.only)
        ok = all(r.ok for r in results)
        print(f"{sum(r.ok for r in results)} of {len(results)} assignments generated in "
              f"{time.perf_counter() - start:.0f} s: student versions in {Path(args.course) / 'release'}")
        return 0 if ok and results else 1
    if args.command == "autograde":
        proc = autograde(args.course, args.assignment, args.student)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        _print_scores(scores(args.course), args.json)
        return proc.returncode
    if args.command == "scores":
        _print_scores(scores(args.course), args.json)
        return 0
    if args.command == "selftest":
        findings = selftest(args.course, args.notebooks, args.only, args.wrong)
        if args.json:
            args.json.write_text(json.dumps(findings, indent=1))
        return 0 if findings and all(f.get("ok") for f in findings.values()) else 1
    return 2  # pragma: no cover


def _print_scores(table: dict, json_path: Path | None) -> None:
    for assignment, students in table.items():
        for student, cells in students.items():
            got = sum(s for s, _ in cells.values())
            top = sum(m for _, m in cells.values())
            print(f"{assignment:40s} {student:20s} {got:g} / {top:g}")
    if json_path:
        json_path.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


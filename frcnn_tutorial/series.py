"""The notebook series as a whole: find the chapters, run them headless, export HTML, keep them clean.

    python -m frcnn_tutorial.series run   [--out build] [--only 00 03] [--timeout 1800]
    python -m frcnn_tutorial.series strip [NOTEBOOK ...]     # drop outputs and execution counts
    python -m frcnn_tutorial.series check [NOTEBOOK ...]     # exit 1 if a notebook is dirty
    python -m frcnn_tutorial.series structure [--dir notebooks]  # exit 1 if a chapter breaks the course format

`make run` and `make clean-notebooks` call this module; the tests call the same functions
(tests/test_series.py runs `structure_problems` over the whole series).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

# The course's chapter table. Each chapter must correct these seed-article claims (the numbers of DESIGN.md's list
# "Seed article: claims the series must correct") in a "Myth vs fact" box; all 16 appear somewhere in the series.
CHAPTERS = tuple(f"{n:02d}" for n in range(11))
REQUIRED_MYTHS: dict[str, tuple[int, ...]] = {
    "00": (1,), "01": (11, 16), "02": (5,), "03": (7, 9, 11), "04": (1, 6, 13), "05": (2, 3, 4),
    "06": (8, 9, 10), "07": (12,), "08": (), "09": (12, 14), "10": (15,),
}
NUM_MYTHS = 16
GRADED_CHAPTERS = ("01", "02", "03", "04", "05", "06", "07", "08")  # nbgrader assignments; the others have none
MIN_GRADED = 2
# Fixed formats the course brief gives every author (tests parse them):
TITLE_LINE = re.compile(r"^# (\d\d) · (\S.*)$")  # first line of the first cell: "# 03 · The region proposal network"
MYTH_FORMAT = """'> **Myth vs fact #N: "<the seed's claim>"**'"""
MYTH_LINE = re.compile(r'^> \*\*Myth vs fact #(\d+): "\S')  # how the first line of a Myth-vs-fact cell starts
MYTH_HEADING_END = re.compile(r'"\*\*\s*$')  # ... and how its bold heading ends (on that line, or a wrapped one)


@dataclass
class RunResult:
    notebook: Path
    title: str
    seconds: float
    ok: bool
    error: str = ""


def notebook_paths(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The chapters in course order: files named NN_something.ipynb, sorted by their number."""
    paths = [p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb")]
    return sorted(paths, key=lambda p: p.name)


def notebook_title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The first Markdown heading of a notebook, without its leading #s."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return fallback


# ----------------------------------------------------------------------------- the course format


def myth_numbers(nb: nbformat.NotebookNode) -> list[int]:
    """The item numbers of the notebook's well-formed Myth-vs-fact boxes, in order of appearance.

    A box is a Markdown cell whose first line is `> **Myth vs fact #N: "<claim>"**` (a long claim may wrap onto
    following `> ` lines: the bold heading ends with `"**`) and that has a `> *Myth (the seed article):*` and a
    `> *Fact:*` line.
    """
    numbers = []
    for cell in nb.cells:
        lines = cell.source.strip().splitlines() if cell.cell_type == "markdown" else []
        match = MYTH_LINE.match(lines[0]) if lines else None
        heading = []  # the heading's lines: the first, and the "> ..." lines that continue it up to '"**'
        for line in lines:
            heading.append(line)
            if MYTH_HEADING_END.search(line) or line.strip() == ">" or not line.startswith(">"):
                break
        has_myth = any(line.startswith("> *Myth (the seed article):*") for line in lines)
        has_fact = any(line.startswith("> *Fact:*") for line in lines)
        if match and MYTH_HEADING_END.search(heading[-1]) and has_myth and has_fact:
            numbers.append(int(match.group(1)))
    return numbers


def nbgrader_meta(cell) -> dict:
    """A cell's nbgrader metadata ({} for a cell nbgrader does not know)."""
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def graded_exercise_problems(nb: nbformat.NotebookNode, name: str) -> tuple[int, list[str]]:
    """(number of graded test cells, problems): each graded cell (grade: true, points) must follow its solution
    cell (solution: true, grade_id without "_tests", BEGIN/END SOLUTION lines), both under `## Exercises`."""
    problems, graded, solutions, seen_ids = [], 0, {}, set()
    exercises_at = _heading_index(nb, "## Exercises")
    for i, cell in enumerate(nb.cells):
        meta = nbgrader_meta(cell)
        if not meta:
            continue
        grade_id = meta.get("grade_id", "")
        if grade_id in seen_ids:
            problems.append(f"{name}: nbgrader grade_id {grade_id!r} is used twice")
        seen_ids.add(grade_id)
        in_exercises = exercises_at is not None and i > exercises_at
        if meta.get("solution"):
            solutions[grade_id] = i
            if "### BEGIN SOLUTION" not in cell.source or "### END SOLUTION" not in cell.source:
                problems.append(f"{name}: solution cell {grade_id!r} lacks its '### BEGIN SOLUTION' / "
                                f"'### END SOLUTION' lines")
        if meta.get("grade"):
            graded += 1
            points = meta.get("points")
            if not isinstance(points, (int, float)) or points <= 0:
                problems.append(f"{name}: graded cell {grade_id!r} has no points (got {points!r})")
            solution_id = grade_id.removesuffix("_tests")
            if solution_id == grade_id or solutions.get(solution_id) is None:
                problems.append(f"{name}: graded cell {grade_id!r} has no solution cell before it (expected a "
                                f"solution cell with grade_id {solution_id!r} and a test cell "
                                f"'{solution_id}_tests')")
        if not in_exercises and (meta.get("grade") or meta.get("solution")):
            problems.append(f"{name}: nbgrader cell {grade_id!r} is not under '## Exercises'")
    return graded, problems


def _heading_index(nb: nbformat.NotebookNode, heading: str) -> int | None:
    """Index of the first Markdown cell holding a line exactly equal to `heading`."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and heading in (line.strip() for line in cell.source.splitlines()):
            return i
    return None


def chapter_problems(path: Path) -> list[str]:
    """Everything that breaks the course format in one chapter, each message naming the notebook (empty: fine).

    Title `# NN · Title` (NN = the file's number) and a `**Goal:**` line in the first cell; `## Summary` then
    `## Exercises`; the Myth-vs-fact boxes REQUIRED_MYTHS assigns to the chapter; in GRADED_CHAPTERS at least
    MIN_GRADED graded nbgrader cells paired with solution cells, elsewhere none (and a collapsed reference
    solution cell after `## Exercises`).
    """
    path = Path(path)
    name, number = path.name, path.name[:2]
    nb = nbformat.read(path, as_version=4)
    problems = []
    first = nb.cells[0] if nb.cells else None
    first_lines = first.source.strip().splitlines() if first is not None and first.cell_type == "markdown" else []
    title = TITLE_LINE.match(first_lines[0]) if first_lines else None
    if not title or title.group(1) != number:
        problems.append(f"{name}: the first cell must be Markdown starting '# {number} · Title' "
                        f"(found {first_lines[0] if first_lines else 'no Markdown'!r})")
    if not any(line.startswith("**Goal:**") for line in first_lines):
        problems.append(f"{name}: the first cell has no '**Goal:** ...' sentence")
    summary, exercises = _heading_index(nb, "## Summary"), _heading_index(nb, "## Exercises")
    if summary is None:
        problems.append(f"{name}: no '## Summary' heading")
    if exercises is None:
        problems.append(f"{name}: no '## Exercises' heading")
    if summary is not None and exercises is not None and summary > exercises:
        problems.append(f"{name}: '## Summary' must come before '## Exercises'")
    found = myth_numbers(nb)
    missing = [n for n in REQUIRED_MYTHS.get(number, ()) if n not in found]
    if missing:
        problems.append(f"{name}: missing Myth-vs-fact box(es) " + ", ".join(f"#{n}" for n in missing)
                        + f" (a Markdown cell whose first line is {MYTH_FORMAT}, then"
                        " '> *Myth (the seed article):* ...' and '> *Fact:* ...' lines)")
    graded, graded_problems = graded_exercise_problems(nb, name)
    problems += graded_problems
    if number in GRADED_CHAPTERS and graded < MIN_GRADED:
        problems.append(f"{name}: {graded} graded nbgrader exercise(s); chapters {GRADED_CHAPTERS[0]}-"
                        f"{GRADED_CHAPTERS[-1]} need at least {MIN_GRADED} "
                        "(grade: true with points, after its solution cell)")
    if number not in GRADED_CHAPTERS:
        if graded:
            problems.append(f"{name}: has graded nbgrader cells; only chapters {GRADED_CHAPTERS[0]}-"
                            f"{GRADED_CHAPTERS[-1]} are assignments")
        hidden = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                  and c.get("metadata", {}).get("jupyter", {}).get("source_hidden")]
        if exercises is not None and not any(i > exercises for i in hidden):
            problems.append(f"{name}: no collapsed reference-solution cell after '## Exercises' "
                            "(a code cell with metadata jupyter.source_hidden = true)")
    return problems


def structure_problems(notebook_dir: Path = NOTEBOOK_DIR) -> list[str]:
    """The course format over the whole series: chapters 00-10 present once each and in order, every chapter's
    chapter_problems, and all NUM_MYTHS Myth-vs-fact items covered somewhere."""
    paths = notebook_paths(notebook_dir)
    numbers = [p.name[:2] for p in paths]
    problems = [f"chapter {n} is missing: no notebooks/{n}_*.ipynb" for n in CHAPTERS if n not in numbers]
    problems += [f"chapter {n} appears {numbers.count(n)} times" for n in sorted(set(numbers))
                 if numbers.count(n) > 1]
    problems += [f"{p.name}: not a chapter of the course (chapters are {CHAPTERS[0]}-{CHAPTERS[-1]})"
                 for p in paths if p.name[:2] not in CHAPTERS]
    covered = set()
    for path in paths:
        problems += chapter_problems(path)
        covered.update(myth_numbers(nbformat.read(path, as_version=4)))
    uncovered = sorted(set(range(1, NUM_MYTHS + 1)) - covered)
    if uncovered:
        problems.append("Myth-vs-fact items covered nowhere in the series: " + ", ".join(f"#{n}" for n in uncovered))
    return problems


# ----------------------------------------------------------------------------- hygiene


def dirty_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of code cells that carry outputs or an execution count."""
    return [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]


def strip_notebook(path: Path) -> bool:
    """Remove outputs and execution counts in place; return True if the file changed."""
    nb = nbformat.read(path, as_version=4)
    if not dirty_cells(nb):
        return False
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.write(nb, path)
    return True


def run_notebook(path: Path, out_dir: Path, timeout: int = 1800) -> RunResult:
    """Execute one notebook in its own folder; write the executed copy and its HTML to out_dir."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    title = notebook_title(nb, path.stem)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    error = ""
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as exc:
        error = _first_lines(str(exc))
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)
    _write_html(nb, out_dir / f"{path.stem}.html")
    return RunResult(path, title, seconds, ok=not error, error=error)


def _first_lines(text: str, n: int = 12) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def _write_html(nb: nbformat.NotebookNode, target: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(target)  # atomic: a half-written page never replaces a good one


def write_index(results: list[RunResult], out_dir: Path) -> Path:
    """build/index.html: the chapters in order, each linked with its title, time and status."""
    rows = "\n".join(
        f'<li><a href="{r.notebook.stem}.html">{html.escape(r.title)}</a> '
        f"&mdash; {r.seconds:.0f} s, {'ok' if r.ok else 'FAILED'}</li>"
        for r in results
    )
    from frcnn_tutorial.utils import profile

    total = sum(r.seconds for r in results)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>frcnn-tutorial</title></head>"
        f"<body><h1>Faster R-CNN with FPN, step by step</h1><ol>\n{rows}\n</ol>"
        f"<p>Profile <code>{html.escape(profile())}</code>: {len(results)} notebooks in {total:.0f} s.</p>"
        "</body></html>\n"
    )
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def run_series(out_dir: Path, only: list[str] | None = None, timeout: int = 1800) -> list[RunResult]:
    """Run every chapter in order (or those whose number is in `only`), printing one line each."""
    results = []
    for path in notebook_paths():
        if only and path.name[:2] not in only:
            continue
        result = run_notebook(path, out_dir, timeout=timeout)
        status = "ok" if result.ok else "FAILED"
        print(f"{path.name:<40} {result.seconds:7.1f} s  {status}", flush=True)
        if not result.ok:
            print(result.error, file=sys.stderr)
        results.append(result)
    write_index(results, out_dir)
    (out_dir / "timings.json").write_text(
        json.dumps({r.notebook.name: round(r.seconds, 1) for r in results}, indent=2)
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frcnn_tutorial.series", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks in order, write HTML to --out")
    run.add_argument("--out", type=Path, default=Path("build"))
    run.add_argument("--only", nargs="*", help="chapter numbers, e.g. 00 03")
    run.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    for name in ("strip", "check"):
        p = sub.add_parser(name)
        p.add_argument("notebooks", nargs="*", type=Path)
    structure = sub.add_parser("structure", help="check chapters 00-10 against the course format")
    structure.add_argument("--dir", type=Path, default=None, help="the notebooks folder (default: notebooks/)")
    args = parser.parse_args(argv)

    if args.command == "structure":
        problems = structure_problems(args.dir or NOTEBOOK_DIR)
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s)" if problems else "the series follows the course format")
        return 1 if problems else 0

    if args.command == "run":
        results = run_series(args.out, args.only, args.timeout)
        failed = [r for r in results if not r.ok]
        total = sum(r.seconds for r in results)
        print(f"{len(results) - len(failed)} of {len(results)} notebooks ran in {total:.0f} s; "
              f"HTML in {args.out}/index.html")
        return 1 if failed or not results else 0
    paths = args.notebooks or notebook_paths()
    if args.command == "strip":
        for path in paths:
            if strip_notebook(path):
                print(f"stripped {path}")
        return 0
    dirty = [p for p in paths if dirty_cells(nbformat.read(p, as_version=4))]
    for path in dirty:
        print(f"{path}: has outputs or execution counts (run `make clean-notebooks`)")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())

"""The series as a whole: chapters 00-10 in order, each in the course format, all 16 seed-article myths corrected.

The format (course brief): first cell `# NN · Title` + `**Goal:**`; `## Summary` then `## Exercises`; the
Myth-vs-fact boxes the chapter table assigns (`> **Myth vs fact #N: "..."**`); chapters 01-08 hold at least two
nbgrader graded cells paired with solution cells. The checks live in frcnn_tutorial.series (also
`python -m frcnn_tutorial.series structure`); the second half of this file checks the checker on small
hand-made notebooks, and `make run`'s runner on a throw-away series.
"""

import json
import re

import nbformat
import pytest

from frcnn_tutorial import series

PATHS = {p.name[:2]: p for p in series.notebook_paths()}


# ----------------------------------------------------------------------------- the real series


def test_chapters_00_to_10_are_all_there_in_order():
    numbers = [p.name[:2] for p in series.notebook_paths()]
    missing = [n for n in series.CHAPTERS if n not in numbers]
    assert not missing, f"chapters missing from notebooks/: {', '.join(missing)} (found {numbers})"
    assert numbers == list(series.CHAPTERS), f"notebooks/ must hold exactly chapters 00-10 once each: {numbers}"


@pytest.mark.parametrize("number", series.CHAPTERS)
def test_chapter_follows_the_course_format(number):
    assert number in PATHS, f"chapter {number} is missing: no notebooks/{number}_*.ipynb"
    problems = series.chapter_problems(PATHS[number])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("number", series.CHAPTERS)
def test_chapter_has_a_title(number):
    assert number in PATHS, f"chapter {number} is missing: no notebooks/{number}_*.ipynb"
    title = series.notebook_title(nbformat.read(PATHS[number], as_version=4), "")
    assert re.match(rf"{number} · \S", title), f"{PATHS[number].name}: title {title!r} is not '{number} · Title'"


def test_all_16_myths_are_corrected_somewhere():
    covered = {n for p in PATHS.values() for n in series.myth_numbers(nbformat.read(p, as_version=4))}
    uncovered = sorted(set(range(1, series.NUM_MYTHS + 1)) - covered)
    where = {n: [c for c, items in series.REQUIRED_MYTHS.items() if n in items] for n in uncovered}
    assert not uncovered, "Myth-vs-fact items in no notebook: " + ", ".join(
        f"#{n} (due in chapter {', '.join(where[n])})" for n in uncovered)


def test_the_chapter_table_assigns_every_myth():
    assigned = {n for items in series.REQUIRED_MYTHS.values() for n in items}
    assert assigned == set(range(1, series.NUM_MYTHS + 1))
    assert list(series.REQUIRED_MYTHS) == list(series.CHAPTERS)


# ----------------------------------------------------------------------------- the checker itself


def myth_box(n: int) -> str:
    return (f'> **Myth vs fact #{n}: "a claim."**\n>\n> *Myth (the seed article):* it is so.\n>\n'
            f"> *Fact:* it is not.")


def graded_pair(number: str, topic: str, points: int = 1) -> list:
    grade_id = f"{number}_{topic}"
    solution = nbformat.v4.new_code_cell(
        f"def exercise_{topic}(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION")
    solution.metadata["nbgrader"] = {"grade": False, "grade_id": grade_id, "locked": False, "schema_version": 3,
                                     "solution": True, "task": False}
    test = nbformat.v4.new_code_cell(f"assert exercise_{topic}(1) == 1")
    test.metadata["nbgrader"] = {"grade": True, "grade_id": f"{grade_id}_tests", "locked": True, "points": points,
                                 "schema_version": 3, "solution": False, "task": False}
    return [solution, test]


def chapter(number: str, myths=None, graded=None, summary=True, exercises=True, title=None, code="x = 1"):
    """A minimal notebook in the course format (myths and graded exercises default to what the chapter needs)."""
    myths = series.REQUIRED_MYTHS[number] if myths is None else myths
    graded = (2 if number in series.GRADED_CHAPTERS else 0) if graded is None else graded
    cells = [nbformat.v4.new_markdown_cell(f"{title or f'# {number} · Chapter {number}'}\n\n**Goal:** learn.")]
    cells.append(nbformat.v4.new_code_cell(code))
    cells += [nbformat.v4.new_markdown_cell(myth_box(n)) for n in myths]
    if summary:
        cells.append(nbformat.v4.new_markdown_cell("## Summary\n\n* done"))
    if exercises:
        cells.append(nbformat.v4.new_markdown_cell("## Exercises\n\n1. Do it."))
    for i in range(graded):
        cells += graded_pair(number, f"topic{i}")
    if exercises and not graded:
        hidden = nbformat.v4.new_code_cell("# Exercise 1: done")
        hidden.metadata["jupyter"] = {"source_hidden": True}
        cells.append(hidden)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return nb


def write(tmp_path, number: str, nb, stem: str = "chapter"):
    path = tmp_path / f"{number}_{stem}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("number", series.CHAPTERS)
def test_a_well_formed_chapter_passes(tmp_path, number):
    assert series.chapter_problems(write(tmp_path, number, chapter(number))) == []


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(summary=False), "no '## Summary'"),
    (dict(exercises=False), "no '## Exercises'"),
    (dict(myths=(12,)), "missing Myth-vs-fact box(es) #14"),
    (dict(title="# 9 · Training"), "'# 09 · Title'"),
    (dict(title="# 10 · Wrong number"), "'# 09 · Title'"),
    (dict(graded=1), "has graded nbgrader cells"),
])
def test_the_checker_names_the_notebook_and_what_is_missing(tmp_path, kwargs, expected):
    problems = series.chapter_problems(write(tmp_path, "09", chapter("09", **kwargs), "training"))
    assert problems and all(p.startswith("09_training.ipynb: ") for p in problems), problems
    assert any(expected in p for p in problems), problems


def test_a_myth_box_must_keep_the_fixed_format(tmp_path):
    nb = chapter("10", myths=())
    nb.cells.insert(2, nbformat.v4.new_markdown_cell("> **Myth vs fact 15: NMS compresses the model**\n> *Fact:* no"))
    nb.cells.insert(2, nbformat.v4.new_markdown_cell("Myth vs fact #15 is below.\n" + myth_box(15)))  # not line 1
    assert series.myth_numbers(nb) == []
    assert any("#15" in p for p in series.chapter_problems(write(tmp_path, "10", nb)))
    no_fact = nbformat.v4.new_markdown_cell(myth_box(15).replace("> *Fact:* it is not.", ""))
    assert series.myth_numbers(nbformat.v4.new_notebook(cells=[no_fact])) == []
    wrapped = nbformat.v4.new_markdown_cell(myth_box(6).replace('"a claim."', '"a long claim that wraps\n> here."'))
    unclosed = nbformat.v4.new_markdown_cell(myth_box(7).replace('"a claim."**', '"a claim.'))
    assert series.myth_numbers(nbformat.v4.new_notebook(cells=[wrapped, unclosed])) == [6]


def test_graded_chapters_need_two_paired_graded_cells(tmp_path):
    problems = series.chapter_problems(write(tmp_path, "03", chapter("03", graded=1)))
    assert any("1 graded nbgrader exercise(s)" in p for p in problems), problems

    nb = chapter("03")
    nb.cells = [c for c in nb.cells if not c.metadata.get("nbgrader", {}).get("solution")]  # tests without solutions
    problems = series.chapter_problems(write(tmp_path, "03", nb))
    assert any("has no solution cell before it" in p and "03_topic0" in p for p in problems), problems

    nb = chapter("03")
    test_cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade"))
    del test_cell.metadata["nbgrader"]["points"]
    assert any("has no points" in p for p in series.chapter_problems(write(tmp_path, "03", nb)))

    nb = chapter("03")
    solution = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution"))
    solution.source = "def exercise_topic0(x):\n    return x"
    assert any("BEGIN SOLUTION" in p for p in series.chapter_problems(write(tmp_path, "03", nb)))

    nb = chapter("03")
    nb.cells += graded_pair("03", "topic0")  # the same grade_id again
    assert any("used twice" in p for p in series.chapter_problems(write(tmp_path, "03", nb)))


def test_graded_cells_belong_under_exercises(tmp_path):
    nb = chapter("05")
    exercises = next(i for i, c in enumerate(nb.cells) if "## Exercises" in c.source)
    nb.cells = nb.cells[:1] + nb.cells[exercises + 1:] + nb.cells[1:exercises + 1]  # graded cells before the heading
    problems = series.chapter_problems(write(tmp_path, "05", nb))
    assert any("not under '## Exercises'" in p for p in problems), problems


def test_an_ungraded_chapter_needs_a_collapsed_solution_cell(tmp_path):
    nb = chapter("10")
    for cell in nb.cells:
        cell.metadata.pop("jupyter", None)
    assert any("collapsed reference-solution" in p for p in series.chapter_problems(write(tmp_path, "10", nb)))


def test_the_series_check_finds_missing_chapters_and_uncovered_myths(tmp_path):
    for number in series.CHAPTERS:
        write(tmp_path, number, chapter(number))
    assert series.structure_problems(tmp_path) == []
    assert series.main(["structure", "--dir", str(tmp_path)]) == 0

    (tmp_path / "08_chapter.ipynb").unlink()
    write(tmp_path, "10", chapter("10", myths=()))  # #15 is only due in 10
    problems = series.structure_problems(tmp_path)
    assert "chapter 08 is missing: no notebooks/08_*.ipynb" in problems
    assert any(p.startswith("10_chapter.ipynb: missing Myth-vs-fact box(es) #15") for p in problems)
    assert "Myth-vs-fact items covered nowhere in the series: #15" in problems
    assert series.main(["structure", "--dir", str(tmp_path)]) == 1


# ----------------------------------------------------------------------------- `make run`


def test_run_executes_the_chapters_in_order_and_writes_the_index(tmp_path, monkeypatch):
    """Three small chapters, written out of order: run in number order, one HTML page each, an index linking them
    in order with their titles, and timings.json with one entry per chapter."""
    notebooks = tmp_path / "nbs"
    notebooks.mkdir()
    for number, title in (("02", "Anchors"), ("00", "Welcome"), ("01", "Boxes & IoU")):
        code = f"with open('order.txt', 'a') as f:\n    f.write('{number}\\n')\nprint('ran {number}')"
        write(notebooks, number, chapter(number, title=f"# {number} · {title}", code=code), title.split()[0].lower())
    monkeypatch.setattr(series, "NOTEBOOK_DIR", notebooks)
    monkeypatch.setattr(series, "notebook_paths", lambda d=notebooks: sorted(d.glob("[0-9][0-9]_*.ipynb")))
    out = tmp_path / "build"

    assert series.main(["run", "--out", str(out)]) == 0
    assert (notebooks / "order.txt").read_text().split() == ["00", "01", "02"]  # each ran once, in order
    stems = ["00_welcome", "01_boxes", "02_anchors"]
    for stem in stems:
        assert "ran " + stem[:2] in (out / f"{stem}.html").read_text()  # the executed output is in the page
    index = (out / "index.html").read_text()
    links = re.findall(r'<a href="([^"]+)">([^<]+)</a>', index)
    assert links == [("00_welcome.html", "00 · Welcome"), ("01_boxes.html", "01 · Boxes &amp; IoU"),
                     ("02_anchors.html", "02 · Anchors")]
    timings = json.loads((out / "timings.json").read_text())
    assert list(timings) == [f"{s}.ipynb" for s in stems] and all(t > 0 for t in timings.values())

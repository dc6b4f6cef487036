"""Classroom assignments (frcnn_tutorial.assignments): student versions and autograding through real nbgrader.

nbgrader runs in its own environment (.venv-classroom, made by `make classroom`; `.ci/run` makes it before
`make test`), so the nbgrader tests drive it as a subprocess. Without that environment they skip on a user's machine
(saying which command sets it up) and fail under CI=true.

What runs where (nbgrader executes whole notebooks, so this is the expensive part of the suite):
- a small fixture notebook of this file: generate, no leaks, autograde three made-up students;
- every chapter 01-08 that exists: static checks of the graded cells, `nbgrader generate_assignment`, no leaks;
- ONE representative chapter (env FRCNN_AUTOGRADE_CHAPTERS, default "06": the box head's losses and
  post-processing, a core chapter that runs in under a minute in the ci profile; "all" for every chapter) is
  autograded for real: solution notebook = full points, student version = zero without a crash, one exercise
  wrong = exactly its points lost. Each chapter costs three notebook runs, so the whole series is left out of CI.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from frcnn_tutorial import assignments

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = assignments.chapter_paths()
CLASSROOM_PYTHON = Path(os.environ.get("FRCNN_CLASSROOM_PYTHON", ROOT / ".venv-classroom" / "bin" / "python"))
AUTOGRADE = os.environ.get("FRCNN_AUTOGRADE_CHAPTERS", "06").split()


# ---------------------------------------------------------------- a small course of our own

SOLUTION_META = {"grade": False, "locked": False, "schema_version": 3, "solution": True, "task": False}
TEST_META = {"grade": True, "locked": True, "schema_version": 3, "solution": False, "task": False}

AREA_SOLUTION = '''\
def exercise_box_area(boxes):
    """[N, 4] x1,y1,x2,y2 -> [N] areas."""
    ### BEGIN SOLUTION
    widths_fixture = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    return widths_fixture * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    ### END SOLUTION
'''
AREA_TEST = '''\
from frcnn_tutorial.grading import check_close
check_close(exercise_box_area(torch.tensor([[0.0, 0, 2, 3]])), [6.0], "box_area([[0,0,2,3]])",
            hint="width times height")
### BEGIN HIDDEN TESTS
check_close(exercise_box_area(torch.tensor([[0.0, 0, 2, 3], [5.0, 5, 4, 9]])), [6.0, 0.0], "hidden_fixture_degenerate",
            hint="a box with x2 < x1 has no area")
### END HIDDEN TESTS
'''
IOU_SOLUTION = '''\
def exercise_box_iou(a, b):
    """[N, 4], [M, 4] -> [N, M] IoU."""
    ### BEGIN SOLUTION
    import torchvision
    return torchvision.ops.box_iou(a, b)  # fixture_iou_solution
    ### END SOLUTION
'''
IOU_TEST = '''\
from frcnn_tutorial.boxes import box_iou
from frcnn_tutorial.grading import check_close
a, b = torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]])
check_close(exercise_box_iou(a, b), box_iou(a, b), "box_iou", hint="intersection over union")
### BEGIN HIDDEN TESTS
check_close(exercise_box_iou(a, a), [[1.0]], "hidden_fixture_self_iou", hint="a box overlaps itself fully")
### END HIDDEN TESTS
'''


def fixture_notebook() -> nbformat.NotebookNode:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    cells = [
        md("# 01 · Fixture\n\n**Goal:** a tiny graded chapter for the assignment machinery."),
        code("import sys\nimport torch\nimport frcnn_tutorial\nprint('KERNEL', sys.executable)\n"
             "print('COURSE', frcnn_tutorial.__file__)\nprint('TORCH', torch.__version__)"),
        md("## Summary\n\nBoxes have areas.\n\n## Exercises\n\n### Exercise 1: box area\n\nWrite `exercise_box_area`."),
        code(AREA_SOLUTION, metadata={"nbgrader": {**SOLUTION_META, "grade_id": "01_box_area"}}),
        code(AREA_TEST, metadata={"nbgrader": {**TEST_META, "grade_id": "01_box_area_tests", "points": 2}}),
        md("### Exercise 2: IoU\n\nWrite `exercise_box_iou(a, b)`."),
        code(IOU_SOLUTION, metadata={"nbgrader": {**SOLUTION_META, "grade_id": "01_box_iou"}}),
        code(IOU_TEST, metadata={"nbgrader": {**TEST_META, "grade_id": "01_box_iou_tests", "points": 3}}),
        code("print('the notebook goes on after the exercises')"),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


@pytest.fixture
def fixture_dir(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nbformat.write(fixture_notebook(), folder / "01_fixture.ipynb")
    return folder


# ---------------------------------------------------------------- static checks (no nbgrader needed)

def test_fixture_exercises_are_found(fixture_dir):
    report = assignments.inspect_chapter(fixture_dir / "01_fixture.ipynb")
    assert report.problems == []
    assert [(e.grade_id, e.function, e.test_id, e.points) for e in report.exercises] == [
        ("01_box_area", "exercise_box_area", "01_box_area_tests", 2.0),
        ("01_box_iou", "exercise_box_iou", "01_box_iou_tests", 3.0)]
    assert [e.task for e in report.exercises] == ["box area", "IoU"]
    table = assignments.markdown_table([report])
    assert "| 01 · Fixture | box area | `exercise_box_area` | 2 |" in table
    assert "**5**" in table


def test_broken_graded_cells_are_reported(tmp_path):
    nb = fixture_notebook()
    nb.cells[3].source = nb.cells[3].source.replace("    ### BEGIN SOLUTION\n", "")  # marker lost
    nb.cells[7].metadata["nbgrader"]["grade_id"] = "01_box_area_tests"  # duplicate id
    nb.cells[8].source = "exercise_box_iou(None, None)"  # would raise in the student version
    path = tmp_path / "01_broken.ipynb"
    nbformat.write(nb, path)
    problems = "\n".join(assignments.inspect_chapter(path).problems)
    assert "without ### BEGIN SOLUTION" in problems
    assert "grade_id also used" in problems
    assert "calls `exercise_box_iou` outside its test cell" in problems


def test_leak_check_finds_solution_and_hidden_lines():
    source = fixture_notebook()
    assert assignments.leaks(source, source)  # the unblanked notebook leaks everything
    release = nbformat.from_dict(json.loads(json.dumps(source)))
    release.cells[3].source = 'def exercise_box_area(boxes):\n    """[N, 4] x1,y1,x2,y2 -> [N] areas."""\n' \
                              "    # YOUR CODE HERE\n    raise NotImplementedError()"
    release.cells[4].source = AREA_TEST.split("### BEGIN HIDDEN TESTS")[0]
    found = assignments.leaks(source, release)
    assert found and all(f.startswith(("cell 6", "cell 7")) for f in found), found  # only exercise 2 leaks


def test_answered_and_wrong_submissions():
    import torch

    boxes = torch.tensor([[0.0, 0, 2, 3]])
    right, bad = {}, {}
    exec(assignments.answered(AREA_SOLUTION), right)
    exec(assignments.wrong(AREA_SOLUTION, "exercise_box_area"), bad)
    assert "BEGIN SOLUTION" not in assignments.answered(AREA_SOLUTION)
    assert right["exercise_box_area"](boxes).tolist() == [6.0]
    assert bad["exercise_box_area"](boxes).tolist() == [7.0]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_graded_cells_follow_the_format(path):
    report = assignments.inspect_chapter(path)
    assert not report.problems, f"{path.name}:\n" + "\n".join(report.problems)
    assert len(report.exercises) >= 2, f"{path.name}: {len(report.exercises)} graded exercises, at least 2 needed"


def test_at_least_12_graded_exercises_across_01_to_08():
    present = {p.name[:2] for p in CHAPTERS}
    missing = sorted(set(assignments.GRADED_CHAPTERS) - present)
    if missing:
        pytest.skip(f"chapters {missing} are not written yet")
    count = sum(len(assignments.inspect_chapter(p).exercises) for p in CHAPTERS)
    assert count >= 12, f"{count} graded exercises across 01-08; the course promises at least 12"


def test_course_venv_has_no_nbgrader():
    """`make lab` and `make test` run in .venv, which must not carry nbgrader or its JupyterLab extensions."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not running in the repository's .venv")
    import importlib.util

    assert importlib.util.find_spec("nbgrader") is None, "nbgrader leaked into .venv: it belongs in .venv-classroom"
    assert not list((ROOT / ".venv" / "share" / "jupyter" / "labextensions").glob("*nbgrader*"))


# ---------------------------------------------------------------- real nbgrader, in .venv-classroom

def classroom(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    if not CLASSROOM_PYTHON.exists() or subprocess.run([str(CLASSROOM_PYTHON), "-c", "import nbgrader"],
                                                       capture_output=True).returncode != 0:
        message = f"no nbgrader at {CLASSROOM_PYTHON}: run `make classroom` (creates .venv-classroom)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; .ci/run must create it before `make test`")
        pytest.skip(message)
    env = {**os.environ, "FRCNN_PROFILE": "ci"}
    proc = subprocess.run([str(CLASSROOM_PYTHON), "-m", "frcnn_tutorial.assignments", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    print(proc.stdout, proc.stderr)
    return proc


def _release_text(course: Path, name: str) -> str:
    return (course / "release" / name / f"{name}.ipynb").read_text()


def test_fixture_course_generate_and_autograde(fixture_dir, tmp_path):
    course = tmp_path / "course"
    out = tmp_path / "findings.json"
    proc = classroom("selftest", "--notebooks", str(fixture_dir), "--course", str(course), "--json", str(out),
                     "--wrong", "01_box_iou")
    findings = json.loads(out.read_text())["01_fixture"]
    assert proc.returncode == 0 and findings["ok"], findings

    # the layout nbgrader documents, and a student version without solution code or hidden tests
    assert (course / "nbgrader_config.py").exists() and (course / "gradebook.db").exists()
    assert (course / "source" / "01_fixture" / "01_fixture.ipynb").exists()
    text = _release_text(course, "01_fixture")
    for secret in ("widths_fixture", "fixture_iou_solution", "hidden_fixture", "BEGIN SOLUTION", "HIDDEN TESTS"):
        assert secret not in text, f"student version contains {secret!r}"
    assert "raise NotImplementedError()" in text and "def exercise_box_area(boxes):" in text

    # the scores, as nbgrader's gradebook has them
    scores = findings["scores"]
    assert scores["solution"] == {"01_box_area_tests": [2.0, 2.0], "01_box_iou_tests": [3.0, 3.0]}
    assert scores["blank"] == {"01_box_area_tests": [0.0, 2.0], "01_box_iou_tests": [0.0, 3.0]}
    assert scores["wrong"] == {"01_box_area_tests": [2.0, 2.0], "01_box_iou_tests": [0.0, 3.0]}

    # nbgrader's kernel runs the course's torch and frcnn_tutorial; the blank notebook ran to its end
    graded = nbformat.read(course / "autograded" / "blank" / "01_fixture" / "01_fixture.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in graded.cells if c.cell_type == "code" for o in c.outputs)
    assert f"COURSE {ROOT / 'frcnn_tutorial' / '__init__.py'}" in printed
    assert "TORCH 2." in printed and "the notebook goes on after the exercises" in printed
    assert "NotImplementedError" in json.dumps(graded.cells[4].outputs)

    # the teacher's commands: `scores` reads the same gradebook
    proc = classroom("scores", "--course", str(course))
    assert proc.returncode == 0 and "blank" in proc.stdout and "0 / 5" in proc.stdout


def test_every_chapter_generates_a_student_version_without_solutions(tmp_path):
    if not CHAPTERS:
        pytest.skip("no chapter 01-08 yet")
    course = tmp_path / "course"
    proc = classroom("build", "--course", str(course))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in CHAPTERS:
        source = nbformat.read(path, as_version=4)
        text = _release_text(course, path.stem)
        release = nbformat.reads(text, as_version=4)
        assert not assignments.leaks(source, release), f"{path.name}: {assignments.leaks(source, release)[:5]}"
        for cell in source.cells:  # search for the solution text itself, line by line
            if assignments.is_solution(cell):
                body, _ = assignments._region(cell.source, assignments.BEGIN_SOLUTION, assignments.END_SOLUTION)
                longest = max((line.strip() for line in body), key=len)
                if longest and longest not in "\n".join(c.source for c in source.cells if c is not cell):
                    assert longest not in text, f"{path.name}: solution line {longest!r} in the student version"
        assert text.count("raise NotImplementedError()") >= len(assignments.inspect_chapter(path).exercises)


@pytest.mark.parametrize("number", AUTOGRADE)
def test_chapter_autograde_scores(number, tmp_path):
    """Real `nbgrader autograde` on submitted/: full points, zero without a crash, exactly one exercise lost."""
    only = [p.name[:2] for p in CHAPTERS] if number == "all" else [number]
    only = [n for n in only if n in {p.name[:2] for p in CHAPTERS}]
    if not only:
        pytest.skip(f"chapter {number} does not exist yet")
    out = tmp_path / "findings.json"
    proc = classroom("selftest", "--course", str(tmp_path / "course"), "--json", str(out), "--only", *only,
                     timeout=3600)
    findings = json.loads(out.read_text())
    assert proc.returncode == 0 and all(f.get("ok") for f in findings.values()), json.dumps(findings, indent=1)
    assert sorted(n[:2] for n in findings) == only


def test_nbgrader_error_names_the_failing_chapter():
    log = ("[GenerateAssignmentApp | INFO] Converting notebook /c/source/./01_a/01_a.ipynb\n"
           "[GenerateAssignmentApp | ERROR] No end solution statement found. Cell contents are: \n"
           "    ## Exercises\n"
           "[GenerateAssignmentApp | ERROR] There was an error processing assignment: /c/source/./01_a\n"
           "[GenerateAssignmentApp | ERROR] There was an error processing assignment '01_a' for student '.'\n")
    assert assignments._nbgrader_error(log, "01_a").startswith("No end solution statement found")

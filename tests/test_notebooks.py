"""Notebook hygiene and the `make run` machinery (the notebooks themselves run under nbval)."""

import json
import shutil

import nbformat
import pytest

from frcnn_tutorial import series

NOTEBOOKS = series.notebook_paths()


def test_the_series_starts_with_the_welcome_notebook():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_welcome.ipynb"
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert numbers == sorted(set(numbers)), f"chapter numbers must be unique and ordered: {numbers}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean_and_valid(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = series.dirty_cells(nb)
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; run `make clean-notebooks`"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel must be python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_summary_and_exercises(path):
    text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    assert "## Summary" in text, f"{path.name} has no '## Summary' section"
    assert "## Exercises" in text, f"{path.name} has no '## Exercises' section"


def test_strip_and_check_catch_a_dirty_notebook(tmp_path, capsys):
    dirty = tmp_path / "01_dirty.ipynb"
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.execution_count = 7
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    nbformat.write(nb, dirty)

    assert series.main(["check", str(dirty)]) == 1
    assert "01_dirty.ipynb" in capsys.readouterr().out
    assert series.strip_notebook(dirty) is True
    assert series.main(["check", str(dirty)]) == 0
    assert series.strip_notebook(dirty) is False  # idempotent


def test_run_notebook_writes_executed_copy_and_html(tmp_path):
    result = series.run_notebook(NOTEBOOKS[0], tmp_path, timeout=600)
    assert result.ok, result.error
    assert result.title.startswith("00")
    html = (tmp_path / "00_welcome.html").read_text()
    assert "Myth vs fact" in html and "<img" in html  # figures were rendered
    executed = nbformat.read(tmp_path / "00_welcome.ipynb", as_version=4)
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
    index = series.write_index([result], tmp_path).read_text()
    assert 'href="00_welcome.html"' in index


def test_run_reports_a_failing_notebook(tmp_path, monkeypatch, capsys):
    broken_dir = tmp_path / "nbs"
    broken_dir.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 99 broken"),
                                         nbformat.v4.new_code_cell("1 / 0")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, broken_dir / "99_broken.ipynb")
    shutil.copy(NOTEBOOKS[0], broken_dir / NOTEBOOKS[0].name)
    monkeypatch.setattr(series, "NOTEBOOK_DIR", broken_dir)
    monkeypatch.setattr(series, "notebook_paths", lambda d=broken_dir: sorted(d.glob("[0-9][0-9]_*.ipynb")))
    code = series.main(["run", "--out", str(tmp_path / "build"), "--only", "99"])
    out = capsys.readouterr()
    assert code == 1
    assert "99_broken.ipynb" in out.out and "FAILED" in out.out
    assert "ZeroDivisionError" in out.err
    timings = json.loads((tmp_path / "build" / "timings.json").read_text())
    assert list(timings) == ["99_broken.ipynb"]

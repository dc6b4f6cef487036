"""The feedback helpers of graded exercises: they pass on right answers and explain wrong ones."""

import pytest
import torch

from frcnn_tutorial.grading import check_close, check_equal, check_shape, check_true
from frcnn_tutorial.utils import show_source


def test_check_close_passes_and_names_the_first_wrong_value():
    check_close(torch.tensor([0.5, 1.0]), [0.5, 1.0], "iou")
    with pytest.raises(AssertionError) as err:
        check_close(torch.tensor([[0.5, 0.25]]), [[0.5, 1 / 7]], "box_iou", hint="union = a + b - inter")
    text = str(err.value)
    assert "box_iou" in text and "expected 0.142857 at [0, 1], got 0.25" in text and "Hint: union" in text


def test_check_close_reports_shape_none_and_nan():
    with pytest.raises(AssertionError, match=r"expected shape \(2, 2\), got \(2,\)"):
        check_close(torch.zeros(2), torch.zeros(2, 2), "x")
    with pytest.raises(AssertionError, match="return"):
        check_close(None, [1.0], "x")
    with pytest.raises(AssertionError, match="non-finite"):
        check_close(torch.tensor([float("nan")]), [1.0], "x")


def test_check_equal_shape_and_true():
    check_equal(torch.tensor([2, 0]), [2, 0], "keep")
    with pytest.raises(AssertionError, match=r"expected \[2, 0\], got \[0, 2\]"):
        check_equal(torch.tensor([0, 2]), torch.tensor([2, 0]), "keep")
    check_shape(torch.zeros(3, 4), (3, 4), "anchors")
    with pytest.raises(AssertionError, match="does not hold"):
        check_true(False, "scores sorted", hint="sort by decreasing score")


def test_show_source_prints_the_shipped_code(capsys):
    from frcnn_tutorial.boxes import box_iou

    show_source(box_iou)
    out = capsys.readouterr().out
    assert out.startswith("# frcnn_tutorial/boxes.py") and "def box_iou(" in out

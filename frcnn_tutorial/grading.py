"""Feedback for graded exercises: checks that say what was expected, what came back, and a hint.

The graded test cells of the notebooks (nbgrader's `grade: true` cells) call these instead of a bare `assert`, so a
student whose answer is wrong reads, for example:

    box_iou([[0,0,2,2]], [[1,1,3,3]]): expected 0.142857 at [0, 0], got 0.25 (max abs error 0.107).
    Hint: the union is area(a) + area(b) - intersection.

Every check raises `AssertionError` (what nbgrader counts as a failed test) and returns None when it passes.
"""

from __future__ import annotations

import torch


def _as_tensor(value, what: str) -> torch.Tensor:
    if value is None:
        raise AssertionError(f"{what}: got None. Did your function `return` its result?")
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise AssertionError(f"{what}: expected a tensor (or numbers), got {type(value).__name__}") from err


def _fail(what: str, message: str, hint: str) -> None:
    raise AssertionError(f"{what}: {message}" + (f"\nHint: {hint}" if hint else ""))


def check_shape(got, expected_shape, what: str, hint: str = "") -> None:
    """The result has exactly `expected_shape`."""
    got = _as_tensor(got, what)
    if tuple(got.shape) != tuple(expected_shape):
        _fail(what, f"expected shape {tuple(expected_shape)}, got {tuple(got.shape)}", hint)


def check_close(got, expected, what: str, hint: str = "", atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Same shape and values within tolerance; on failure name the first wrong element and the largest error."""
    got_t = _as_tensor(got, what)
    exp_t = _as_tensor(expected, what).to(torch.float64)
    check_shape(got_t, exp_t.shape, what, hint)
    got_t = got_t.to(torch.float64)
    if not torch.isfinite(got_t).all() and torch.isfinite(exp_t).all():
        _fail(what, f"got non-finite values (NaN or inf): {got_t.tolist()}", hint or "look for a division by zero")
    wrong = ~torch.isclose(got_t, exp_t, atol=atol, rtol=rtol, equal_nan=True)
    if wrong.any():
        index = [int(i) for i in wrong.nonzero()[0]]
        at = f" at {index}" if index else ""
        first_exp = exp_t[tuple(index)].item() if index else exp_t.item()
        first_got = got_t[tuple(index)].item() if index else got_t.item()
        worst = (got_t - exp_t).abs().nan_to_num(float("inf")).max().item()
        _fail(what, f"expected {first_exp:.6g}{at}, got {first_got:.6g} (max abs error {worst:.3g}, "
                    f"{int(wrong.sum())} of {wrong.numel()} values wrong)", hint)


def check_equal(got, expected, what: str, hint: str = "") -> None:
    """Exactly equal (indices, labels, counts): shows both in full when short."""
    got_t, exp_t = _as_tensor(got, what), _as_tensor(expected, what)
    if got_t.shape != exp_t.shape or not torch.equal(got_t.to(exp_t.dtype), exp_t):
        _fail(what, f"expected {exp_t.tolist()}, got {got_t.tolist()}", hint)


def check_true(condition: bool, what: str, hint: str = "") -> None:
    """A property that must hold, stated in words."""
    if not condition:
        _fail(what, "does not hold", hint)

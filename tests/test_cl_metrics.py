"""ACC / BWT / forgetting / learning accuracy against matrices worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lance_cl.cl.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    learning_accuracy,
    summary,
)

# Task 0's accuracy *rises* after task 1 (95 > 90), so Chaudhry's forgetting (max over the
# past) differs from -BWT (which compares with the diagonal only).
R3 = [
    [90.0, 10.0, 5.0],
    [95.0, 85.0, 7.0],
    [70.0, 88.0, 60.0],
]


def test_three_tasks_by_hand() -> None:
    # ACC = (70 + 88 + 60) / 3
    assert average_accuracy(R3) == pytest.approx(218.0 / 3.0)
    # BWT = ((70 - 90) + (88 - 85)) / 2 = (-20 + 3) / 2
    assert backward_transfer(R3) == pytest.approx(-8.5)
    # forgetting: task 0: max(90, 95) - 70 = 25; task 1: 85 - 88 = -3 -> (25 - 3) / 2
    assert forgetting(R3) == pytest.approx(11.0)
    # learning accuracy: (90 + 85 + 60) / 3
    assert learning_accuracy(R3) == pytest.approx(235.0 / 3.0)


def test_partial_matrix_after_two_tasks() -> None:
    # top-left block [[90, 10], [95, 85]]
    expected = {"acc": 90.0, "bwt": 5.0, "forgetting": -5.0, "learning_accuracy": 87.5}
    assert summary(R3, k=2) == pytest.approx(expected)
    # the runner's partial results: only the rows of finished tasks, every column filled
    assert summary(np.asarray(R3)[:2]) == pytest.approx(expected)
    # one task: nothing to forget
    assert summary(R3, k=1) == pytest.approx(
        {"acc": 90.0, "bwt": 0.0, "forgetting": 0.0, "learning_accuracy": 90.0}
    )
    assert summary([[42.0, 3.0, 1.0]]) == pytest.approx(
        {"acc": 42.0, "bwt": 0.0, "forgetting": 0.0, "learning_accuracy": 42.0}
    )


def test_four_tasks_by_hand_upper_triangle_ignored() -> None:
    R4 = np.array(
        [
            [50.0, 99.0, 99.0, 99.0],
            [40.0, 60.0, 99.0, 99.0],
            [45.0, 30.0, 70.0, 99.0],
            [35.0, 55.0, 65.0, 80.0],
        ]
    )
    assert average_accuracy(R4) == pytest.approx(235.0 / 4.0)  # (35 + 55 + 65 + 80) / 4
    assert backward_transfer(R4) == pytest.approx(-25.0 / 3.0)  # (-15 - 5 - 5) / 3
    # max(50, 40, 45) - 35 = 15; max(60, 30) - 55 = 5; 70 - 65 = 5
    assert forgetting(R4) == pytest.approx(25.0 / 3.0)
    assert learning_accuracy(R4) == pytest.approx(65.0)  # (50 + 60 + 70 + 80) / 4
    # after three tasks: row 2 of the 3x3 block
    assert average_accuracy(R4, k=3) == pytest.approx((45.0 + 30.0 + 70.0) / 3.0)
    assert backward_transfer(R4, k=3) == pytest.approx(((45.0 - 50.0) + (30.0 - 60.0)) / 2.0)
    assert forgetting(R4, k=3) == pytest.approx(((50.0 - 45.0) + (60.0 - 30.0)) / 2.0)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        average_accuracy([1.0, 2.0])
    with pytest.raises(ValueError):
        average_accuracy(R3, k=4)

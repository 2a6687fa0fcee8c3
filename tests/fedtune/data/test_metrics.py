"""GLUE metrics against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.data.glue import TASKS, label_array, load_glue
from fedtune.data.metrics import compute_metrics, main_metric, majority_class_rate

# 8 examples: TP=3 (rows 0-2), FN=1 (row 3), FP=2 (rows 4-5), TN=2 (rows 6-7).
LABELS = [1, 1, 1, 1, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 1, 1, 0, 0]
ACCURACY = 5 / 8
F1 = 2 * 3 / (2 * 3 + 2 + 1)  # 2TP / (2TP + FP + FN) = 6/9
MCC = (3 * 2 - 2 * 1) / np.sqrt((3 + 2) * (3 + 1) * (2 + 2) * (2 + 1))  # 4 / sqrt(240)


def test_binary_f1_tasks() -> None:
    for task in ("mrpc", "qqp"):
        got = compute_metrics(task, PREDS, LABELS)
        assert got == pytest.approx({"accuracy": ACCURACY, "f1": F1})
        assert F1 == pytest.approx(2 / 3)


def test_cola_matthews_correlation() -> None:
    got = compute_metrics("cola", PREDS, LABELS)
    assert got == pytest.approx({"accuracy": ACCURACY, "matthews_correlation": MCC})
    assert MCC == pytest.approx(0.2581988897)
    # constant predictions carry no information: MCC 0, however accurate
    assert compute_metrics("cola", [1] * 8, [1] * 7 + [0])["matthews_correlation"] == 0.0
    # perfect and perfectly inverted predictions
    assert compute_metrics("cola", LABELS, LABELS)["matthews_correlation"] == pytest.approx(1.0)
    inverted = [1 - y for y in LABELS]
    assert compute_metrics("cola", inverted, LABELS)["matthews_correlation"] == pytest.approx(-1.0)


def test_accuracy_only_tasks_and_three_classes() -> None:
    assert compute_metrics("sst2", PREDS, LABELS) == pytest.approx({"accuracy": ACCURACY})
    assert compute_metrics(TASKS["mnli"], [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}


def test_logits_are_argmaxed() -> None:
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-5.0, 5.0], [0.9, 0.1]])
    assert compute_metrics("mrpc", logits, [0, 1, 0, 0]) == pytest.approx({"accuracy": 0.75, "f1": 2 / 3})


def test_f1_without_positive_predictions_is_zero() -> None:
    assert compute_metrics("qqp", [0, 0, 0], [1, 0, 0]) == pytest.approx({"accuracy": 2 / 3, "f1": 0.0})


def test_main_metric() -> None:
    assert main_metric("cola") == "matthews_correlation"
    assert {main_metric(t) for t in TASKS if t != "cola"} == {"accuracy"}
    with pytest.raises(ValueError, match="'glue'"):
        main_metric("glue")


def test_majority_class_rate(glue_dir: Path) -> None:
    assert majority_class_rate([0, 1, 1, 1]) == 0.75
    assert majority_class_rate(np.array([2, 2, 0])) == pytest.approx(2 / 3)
    cola = load_glue("cola", glue_dir)
    assert majority_class_rate(label_array(cola.eval)) == pytest.approx(721 / 1043)
    with pytest.raises(ValueError, match="at least one label"):
        majority_class_rate([])


@pytest.mark.parametrize(
    ("preds", "labels", "pattern"),
    [
        ([0, 1], [0, 1, 1], "2 predictions but 3 labels"),
        ([], [], "zero examples"),
        ([0, 2], [0, 1], r"predictions contain class ids \[2\]"),
        ([0, 1], [0, -1], r"labels contain class ids \[-1\]"),
        (np.zeros((2, 3)), [0, 1], "3 columns, expected 2"),
    ],
)
def test_bad_inputs(preds: object, labels: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        compute_metrics("mrpc", preds, labels)

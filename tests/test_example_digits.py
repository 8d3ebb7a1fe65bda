"""examples/train_digits.py on a reduced setting: it learns, and clconv trains like torch."""
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cases import load_example  # noqa: E402


def test_train_digits_matches_torch(capsys):
    results = load_example("train_digits").main(["--epochs", "3", "--limit", "400", "--compare"])
    assert results["problems"] == []
    ours, theirs = results["clconv"], results["torch"]
    assert len(ours["loss"]) == 3 and ours["loss"][-1] < ours["loss"][0] - 0.1
    for a, b in zip(ours["accuracy"], theirs["accuracy"]):
        assert abs(a - b) * results["test_size"] <= 1.01          # at most one test sample
    for a, b in zip(ours["loss"], theirs["loss"]):
        assert a == pytest.approx(b, rel=1e-3)
    assert "epoch   3" in capsys.readouterr().out

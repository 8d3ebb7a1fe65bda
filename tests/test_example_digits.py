"""examples/train_digits.py on a reduced setting: it learns, and clconv trains like torch."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_digits_matches_torch(capsys):
    results = load_example().main(["--epochs", "3", "--limit", "400", "--compare"])
    assert results["problems"] == []
    ours, theirs = results["clconv"], results["torch"]
    assert len(ours["loss"]) == 3 and ours["loss"][-1] < ours["loss"][0] - 0.1
    for a, b in zip(ours["accuracy"], theirs["accuracy"]):
        assert abs(a - b) * results["test_size"] <= 1.01          # at most one test sample
    for a, b in zip(ours["loss"], theirs["loss"]):
        assert a == pytest.approx(b, rel=1e-3)
    assert "epoch   3" in capsys.readouterr().out

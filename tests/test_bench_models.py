"""clconv bench --models: whole models, converted, against torch eager (on small torch.nn
models here: torchvision is an optional extra that does not install beside torch 2.13)."""
import copy
import os
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from clconv import bench_models  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cases import load_example  # noqa: E402
from test_device import run_cli  # noqa: E402


def small_resnet():
    example = load_example("train_step")
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(inplace=True), example.Bottleneck(8, 4, 2),
                         example.Bottleneck(16, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def test_inference_row_compares_the_fused_model_with_eager():
    model = small_resnet()
    before = copy.deepcopy(model.state_dict())
    row = bench_models.bench_inference("small", model, 2, 20, 2)
    assert row.mode == "inference" and row.batch == 2
    assert len(row.torch_ms) == len(row.clconv_ms) == 2
    assert min(row.torch_ms) > 0 and min(row.clconv_ms) > 0 and row.speedup > 0
    assert 0 < row.difference < 1e-4          # folded BatchNorm: rounding, not bitwise
    for key, value in model.state_dict().items():   # the benchmarked model is untouched
        assert torch.equal(value, before[key]), key
    assert "inference" in bench_models.format_row(row)


def test_training_row_breaks_the_converted_step_down():
    row = bench_models.bench_training("small", small_resnet(), 3, 20, 2)
    assert row.mode == "training step" and row.difference < 1e-4
    assert 0 < row.convolutions_ms <= row.step_ms
    line = bench_models.format_row(row)
    assert len(line.split()) == 12      # 11 columns, "training step" two words


def test_model_names_are_checked():
    assert bench_models.parse_names("all") == bench_models.MODELS
    assert bench_models.parse_names("resnet50, mobilenet_v2") == ("resnet50", "mobilenet_v2")
    with pytest.raises(ValueError, match="at least one model"):
        bench_models.parse_names(" , ")


def test_cli_models_says_how_to_get_torchvision():
    if bench_models.torchvision_models() is not None:
        proc = run_cli("bench", "--models", "no_such_model")
        assert proc.returncode == 2 and "has no model 'no_such_model'" in proc.stderr
        return
    proc = run_cli("bench", "--models", "resnet50")
    assert proc.returncode == 2, proc.stderr
    assert "needs torchvision" in proc.stderr and "clconv[models]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_table_names_the_openmp_setting(monkeypatch):
    for name in bench_models.THREAD_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert "GOMP_SPINCOUNT=10000" in bench_models.thread_note()       # the advice
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert bench_models.thread_note() == "OpenMP: OMP_WAIT_POLICY=PASSIVE"

import os

import numpy as np
import pytest

import clconv


@pytest.fixture(scope="session", autouse=True)
def private_tuning_cache(tmp_path_factory):
    """No test reads or writes the user's own tuning cache, nor follows their CLCONV_TUNE."""
    saved = {k: os.environ.pop(k, None) for k in ("CLCONV_CACHE_DIR", "CLCONV_TUNE",
                                                   "CLCONV_TUNE_BUDGET")}
    os.environ["CLCONV_CACHE_DIR"] = str(tmp_path_factory.mktemp("clconv-cache"))
    yield
    for key, value in saved.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


@pytest.fixture(scope="session")
def queue():
    return clconv.queue_for()


@pytest.fixture(scope="session")
def has_fp64(queue):
    return clconv.device_info(queue.device).fp64


@pytest.fixture
def no_device_work(monkeypatch):
    """Any launch, plan or upload fails the test."""
    import clconv.arrays
    import clconv.functional
    import clconv.module
    import clconv.planner

    def forbidden(*args, **kwargs):
        raise AssertionError("device work started before the arguments were rejected")

    monkeypatch.setattr(clconv.functional, "run", forbidden)
    monkeypatch.setattr(clconv.module, "run", forbidden)
    monkeypatch.setattr(clconv.planner, "plan", forbidden)
    monkeypatch.setattr(clconv.arrays, "operand", forbidden)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_report_header(config):
    q = clconv.queue_for()
    info = clconv.device_info(q.device)
    return (f"clconv {clconv.__version__} from {os.path.dirname(clconv.__file__)}; device: "
            f"{info.name} ({info.platform}, driver {info.driver_version})")

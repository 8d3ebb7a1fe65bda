import os

import numpy as np
import pytest

import clconv


@pytest.fixture(scope="session")
def queue():
    return clconv.queue_for()


@pytest.fixture(scope="session")
def has_fp64(queue):
    return clconv.device_info(queue.device).fp64


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_report_header(config):
    q = clconv.queue_for()
    info = clconv.device_info(q.device)
    return (f"clconv {clconv.__version__} from {os.path.dirname(clconv.__file__)}; device: "
            f"{info.name} ({info.platform}, driver {info.driver_version})")

"""The convolution algorithms, per operation, and the choice of one for a problem on a device."""
from __future__ import annotations

from .base import OPERATIONS, Algorithm, Launch, Param
from .depthwise import Depthwise
from .direct import Direct
from .implicit_gemm import ImplicitGemm
from .input_grad_depthwise import InputGradDepthwise
from .input_grad_forward import InputGradForward, InputGradSpread
from .input_grad_gemm import InputGradGemm
from .tiled_gemm import TiledGemm
from .weight_grad_channels import WeightGradChannels
from .weight_grad_gemm import WeightGradGemm
from .winograd import Winograd

ALGORITHMS = {a.name: a for a in (Depthwise(), Winograd(), TiledGemm(), ImplicitGemm(), Direct(),
                                  InputGradDepthwise(), InputGradForward(), InputGradSpread(),
                                  InputGradGemm(), WeightGradChannels(), WeightGradGemm())}


def for_operation(operation):
    """The algorithms that compute operation ('forward', 'input_grad', 'weight_grad')."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {tuple(OPERATIONS)}, got {operation!r}")
    return [a for a in ALGORITHMS.values() if a.operation == operation]


def choose(problem, info, operation="forward"):
    """(algorithm, config) by heuristic: the first algorithm preferred for problem (and
    suited to the device) whose default configuration is valid on the device, with that
    default; else the first that applies."""
    for algorithm in for_operation(operation):
        if algorithm.preferred(problem) and algorithm.suits(info):
            config = algorithm.default_config(problem, info)
            if not algorithm.constraints(problem, info, config):
                return algorithm, config
    for algorithm in for_operation(operation):
        if algorithm.applies(problem):
            return algorithm, algorithm.default_config(problem, info)
    raise ValueError(f"no {operation} algorithm applies to {problem}")


__all__ = ["ALGORITHMS", "OPERATIONS", "Algorithm", "Launch", "Param", "choose",
           "for_operation"]

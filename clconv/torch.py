"""PyTorch front end: torch.nn.Conv2d and autograd with every convolution run by clconv.

    import clconv.torch
    y = clconv.torch.conv2d(x, w, b, stride=2, padding=1, activation="relu")
    model = clconv.torch.convert(model)       # every nn.Conv2d now runs through clconv

- `Conv2dFunction`: a torch.autograd.Function; forward with clconv.conv2d, backward with
  clconv.conv2d_input_grad, conv2d_weight_grad and conv2d_bias_grad (only the gradients that
  autograd asks for). float16/32/64, batched or unbatched, every argument of nn.Conv2d.
- `conv2d(...)`: torch.nn.functional.conv2d plus padding_mode, `activation` and `residual`.
  Without autograd (torch.no_grad(), or no operand requiring a gradient) bias, residual and
  activation are fused into the one kernel; with autograd the activation and residual are
  applied by torch after the convolution, so that gradients are exact.
- `Conv2d`: a torch.nn.Conv2d subclass (same constructor plus `activation=`, same
  parameters and state_dict keys, so checkpoints load unchanged).
- `convert(model)`: swaps the nn.Conv2d modules of a model for `Conv2d` in place, keeping
  the Parameter objects, and fuses the activation that follows a convolution in an
  nn.Sequential.

Cost: tensors live in torch's (CPU) memory, so every call uploads its operands (input,
weight, bias, residual; grad_output and the saved tensors in backward) to the OpenCL device
and downloads its result once. For chains of convolutions that stay on the device, use the
core API with pyopencl arrays: clconv.conv2d accepts and returns pyopencl.array.Array.

This module needs torch; the core package never imports it.
"""
from __future__ import annotations

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.autograd.function import once_differentiable
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError("clconv.torch needs PyTorch: pip install torch") from err

import clconv

__all__ = ["Conv2dFunction", "conv2d", "Conv2d", "convert", "ACTIVATIONS"]

ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu}
_DTYPES = (torch.float16, torch.float32, torch.float64)


def _check_activation(activation):
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, "
                         f"got {activation!r}")
    return activation


def _numpy(tensor, name):
    """A contiguous NumPy copy/view of a tensor (None stays None)."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got {tensor.dtype}")
    return tensor.detach().cpu().contiguous().numpy()


def _tensor(array, like):
    return torch.from_numpy(array).to(like.device)


class Conv2dFunction(torch.autograd.Function):
    """apply(input, weight, bias, stride, padding, dilation, groups, padding_mode)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride=1, padding=0, dilation=1, groups=1,
                padding_mode="zeros"):
        ctx.geometry = (stride, padding, dilation, groups, padding_mode)
        ctx.save_for_backward(input, weight)
        y = clconv.conv2d(_numpy(input, "input"), _numpy(weight, "weight"),
                          _numpy(bias, "bias"), *ctx.geometry)
        return _tensor(y, input)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        g = _numpy(grad_output, "grad_output")
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = _tensor(clconv.conv2d_input_grad(
                tuple(input.shape), _numpy(weight, "weight"), g, *ctx.geometry), input)
        if ctx.needs_input_grad[1]:
            grad_weight = _tensor(clconv.conv2d_weight_grad(
                _numpy(input, "input"), tuple(weight.shape), g, *ctx.geometry), weight)
        if ctx.needs_input_grad[2]:
            grad_bias = _tensor(clconv.conv2d_bias_grad(g), weight)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           padding_mode="zeros", activation=None, residual=None):
    """activation(conv2d(input, weight, bias) + residual), the convolution run by clconv.

    activation: None, "relu", "relu6", "silu" or "gelu" (erf form, torch's default).
    residual: None or a tensor of the output's shape and dtype.
    """
    _check_activation(activation)
    operands = (input, weight, bias, residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands):
        y = Conv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups,
                                 padding_mode)
        if residual is not None:
            y = y + residual
        return y if activation is None else ACTIVATIONS[activation](y)
    y = clconv.conv2d(_numpy(input, "input"), _numpy(weight, "weight"), _numpy(bias, "bias"),
                      stride, padding, dilation, groups, padding_mode, activation=activation,
                      residual=_numpy(residual, "residual"))
    return _tensor(y, input)


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d whose convolution runs on clconv's OpenCL device.

    Same constructor (plus `activation=`, applied after the convolution, fused into its
    kernel at inference), parameters, initialisation and state_dict as torch.nn.Conv2d.
    forward(input, residual=None) computes activation(conv(input) + residual).
    """

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _check_activation(activation)

    def _conv_forward(self, input, weight, bias, activation=None, residual=None):
        # padding_mode goes to clconv as is: it pads where the kernel reads, no padded copy.
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                      self.groups, self.padding_mode, activation=activation, residual=residual)

    def forward(self, input, residual=None):
        return self._conv_forward(input, self.weight, self.bias, self.activation, residual)

    def extra_repr(self):
        s = super().extra_repr()
        return s if self.activation is None else f"{s}, activation={self.activation!r}"

    @classmethod
    def from_torch(cls, module, activation=None):
        """A Conv2d with the configuration, training flag and a copy of the weights of a
        torch.nn.Conv2d."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size,
                  stride=module.stride, padding=module.padding, dilation=module.dilation,
                  groups=module.groups, bias=module.bias is not None,
                  padding_mode=module.padding_mode, device=module.weight.device,
                  dtype=module.weight.dtype, activation=activation)
        new.load_state_dict(module.state_dict())
        return new.train(module.training)


# Activation modules that convert() fuses into the convolution before them.
_FUSABLE = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu"}


def _fusable(module):
    """The activation name of module if it can be fused into a convolution, else None."""
    if type(module) is nn.GELU and module.approximate != "none":
        return None
    return _FUSABLE.get(type(module))


def _convertible(module):
    # Exactly nn.Conv2d: a subclass may override forward (or be a parametrization's class),
    # which a plain swap would silently drop.
    return type(module) is nn.Conv2d


def _swap(module, activation=None):
    new = Conv2d.from_torch(module, activation)
    new.weight, new.bias = module.weight, module.bias   # the same Parameter objects
    return new


def convert(model, fuse=True):
    """Replace every torch.nn.Conv2d of model (recursively) by clconv.torch.Conv2d, in place,
    keeping the Parameter objects (an optimiser holding them keeps working) and the training
    flag; forward hooks of the replaced modules are not carried over. Returns the model (a new
    module if model itself is an nn.Conv2d).

    fuse: in an nn.Sequential (whose forward feeds each module's output only to the next), a
    convolution followed by nn.ReLU, nn.ReLU6, nn.SiLU or nn.GELU() (erf form) takes the
    activation into its kernel and the activation module becomes nn.Identity.
    """
    if _convertible(model):
        return _swap(model)
    children = list(model.named_children())
    sequential = (fuse and isinstance(model, nn.Sequential)
                  and type(model).forward is nn.Sequential.forward)
    for i, (name, child) in enumerate(children):
        if not _convertible(child):
            convert(child, fuse)
            continue
        activation = None
        if sequential and i + 1 < len(children):
            next_name, next_child = children[i + 1]
            activation = _fusable(next_child)
            if activation is not None:
                setattr(model, next_name, nn.Identity())
        setattr(model, name, _swap(child, activation))
    return model

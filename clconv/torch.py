"""PyTorch front end: torch.nn.Conv2d and autograd with every convolution run by clconv.

    import clconv.torch
    y = clconv.torch.conv2d(x, w, b, stride=2, padding=1, activation="relu")
    model = clconv.torch.convert(model)       # every nn.Conv2d now runs through clconv

- The torch operators `torch.ops.clconv.conv2d` (input, weight, bias, residual, activation,
  stride, padding, padding_str, dilation, groups, padding_mode) and its gradients
  `torch.ops.clconv.conv2d_input_grad`, `conv2d_weight_grad`, `conv2d_bias_grad`
  (torch.library custom ops, each with a fake kernel), so torch.jit.trace, torch.compile and
  torch.export record the call instead of its result. Autograd of the forward computes only
  the gradients asked for; double backward is an error. CPU tensors of float16/32/64,
  batched or unbatched, every argument of nn.Conv2d; the output (and the input and weight
  gradients) take torch's memory format: channels_last if the input or the weight is.
  Tracing records the grad mode's choice of fusion (see conv2d): trace under no_grad for
  inference (jit.trace's own check reruns under no_grad, so a trace with autograd recording
  and a fused activation fails that check; pass check_trace=False).
- `conv2d(...)`: torch.nn.functional.conv2d plus padding_mode, `activation` and `residual`:
  activation(conv2d(input, weight, bias) + residual) with torch's broadcasting and type
  promotion. A residual of the output's exact shape and dtype is fused into the kernel, any
  other is added by torch; the activation is fused after a fused (or no) residual when no
  gradient is recorded, else torch applies it, so that gradients are exact.
- `Conv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups,
  padding_mode)`: the forward operator, under the name of the former autograd.Function.
- `Conv2d`: a torch.nn.Conv2d subclass (same constructor plus `activation=`, same
  parameters and state_dict keys, so checkpoints load unchanged).
- `BatchNorm2d`: a torch.nn.BatchNorm2d subclass with `activation=`; in training, the
  Conv2d it follows (paired by convert) computes both, batch statistics and gradients
  included, on clconv's device (clconv.conv2d_batch_norm).
- `convert(model)`: swaps the nn.Conv2d modules of a model for `Conv2d` in place, keeping
  the Parameter objects, and fuses the activation that follows a convolution in an
  nn.Sequential (in train mode, the BatchNorm2d and activation after it); in eval mode it
  also returns a torch.fx graph of the model for inference, BatchNorm folded into the
  convolutions, residual additions and activations fused into their epilogues, and each
  run of consecutive convolutions one ConvChain, which keeps the intermediate results on
  the device and waits once.

Eager calls that nothing observes (no tracing, compiling, profiler, torch function or
dispatch mode, functorch transform; plain tensors) skip torch's dispatcher: an unrecorded
call runs the operator's kernel, a recorded one the operator's autograd.Function
(_RecordedConv2d), whose backward computes every gradient asked for in one
clconv.conv2d_backward call. Anything observed goes through the registered operators.

Cost: tensors live in torch's (CPU) memory. On a device that computes in the host's memory
(a CPU device) contiguous tensors are handed to the kernels in place and the result is
written into a tensor's own memory (a channels_last tensor is made contiguous first, and
its result laid out again: a copy each way); on other devices every call uploads its
operands and downloads its result once. convert's inference graph keeps each run of
convolutions on the device (ConvChain); for other chains use the core API with pyopencl
arrays: clconv.conv2d accepts and returns pyopencl.array.Array.

This module needs torch; the core package never imports it.
"""
from __future__ import annotations

import collections
import itertools
import math
import operator
import warnings

try:
    import torch
    import torch.fx
    import torch.nn.functional as F
    from torch import nn
    # Tensor.suggest_memory_format, which torch's convolution follows, has no public Python
    # name; this is its Python twin (also used by torch's own meta kernels).
    from torch._prims_common import suggest_memory_format
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError("clconv.torch needs PyTorch: pip install torch") from err

import numpy as np
import pyopencl as cl

import clconv
from clconv import arrays, functional, scratch
from clconv.limits import check_device_limits
from clconv.problem import as_int, as_pair, make_problem

__all__ = ["Conv2dFunction", "conv2d", "Conv2d", "BatchNorm2d", "ConvChain", "convert",
           "ACTIVATIONS"]

ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu}
_DTYPES = (torch.float16, torch.float32, torch.float64)


def _check_activation(activation):
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, "
                         f"got {activation!r}")
    return activation


def _check(tensor, name):
    """A tensor clconv takes: on the CPU (clconv copies it to its own device), float."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise TypeError(f"{name} must be a CPU tensor, got one on {tensor.device}")
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got {tensor.dtype}")


def _numpy(tensor, name):
    """A contiguous NumPy copy/view of a tensor (None stays None)."""
    _check(tensor, name)
    return None if tensor is None else tensor.detach().contiguous().numpy()


# The geometry arguments every operator ends with. A custom op's schema has no "int, pair
# or str" type, so torch's padding strings ('valid', 'same') travel in padding_str.
_GEOMETRY = ("int[] stride, int[] padding, str? padding_str, int[] dilation, int groups, "
             "str padding_mode")


def _geometry(stride, padding, dilation, groups, padding_mode):
    """nn.Conv2d's geometry arguments as the operators take them."""
    padding_str = padding if isinstance(padding, str) else None
    pair = (0, 0) if padding_str is not None else as_pair(padding, "padding")
    return (list(as_pair(stride, "stride")), list(pair), padding_str,
            list(as_pair(dilation, "dilation")), as_int(groups, "groups"), padding_mode)


def _core(stride, padding, padding_str, dilation, groups, padding_mode):
    """The operators' geometry arguments as the core API takes them."""
    return (stride, padding if padding_str is None else padding_str, dilation, groups,
            padding_mode)


def _output_shape(input, weight, bias, *geometry):
    """The checked call's output shape, from shapes and dtypes alone (fake kernels use it)."""
    _check(input, "input")
    problem, unbatched = _problem(input.shape, input.dtype, weight, bias, *geometry)
    return problem.output_shape[1:] if unbatched else problem.output_shape


def _problem(input_shape, input_dtype, weight, bias, *geometry):
    """(Problem, unbatched) of a call on an input of that shape and dtype, weight and bias
    checked as tensors clconv takes."""
    _check(weight, "weight")
    _check(bias, "bias")
    return make_problem(
        input_shape, input_dtype, weight.shape, weight.dtype,
        None if bias is None else bias.shape, None if bias is None else bias.dtype,
        *_core(*geometry))


def _memory_format(input, weight):
    """torch's convolution output format: channels_last if the input (unbatched: its batch of
    one) or the weight is laid out channels_last; the input and weight gradients follow it."""
    batched = input if input.dim() == 4 else input.unsqueeze(0)
    key = (tuple(batched.shape), batched.stride(), tuple(weight.shape), weight.stride())
    # Only plain sizes key the table (a fake kernel's may be symbolic).
    known = all(type(n) is int for part in key for n in part)
    found = _formats.get(key) if known else None
    if found is None:
        channels_last = torch.channels_last in (suggest_memory_format(batched),
                                                suggest_memory_format(weight))
        found = torch.channels_last if channels_last else torch.contiguous_format
        if known:
            if len(_formats) >= _FORMATS_KEPT:
                _formats.clear()
            _formats[key] = found
    return found


# _memory_format's answers by sizes and strides (suggest_memory_format costs ~8 µs a call).
_formats = {}
_FORMATS_KEPT = 4096


def _formatted(tensor, memory_format):
    """A contiguous tensor with the strides torch gives memory_format (an unbatched one: those
    of its batch of one). A copy, not .contiguous(): that keeps ambiguous strides, e.g. of
    shape (C, 1, kH, kW)."""
    if memory_format == torch.contiguous_format:
        return tensor
    batched = tensor if tensor.dim() == 4 else tensor.unsqueeze(0)
    out = batched.clone(memory_format=memory_format)
    return out if tensor.dim() == 4 else out[0]


def _conv2d_kernel(input, weight, bias, residual, activation, *geometry):
    """clconv::conv2d's CPU kernel."""
    y = clconv.conv2d(_numpy(input, "input"), _numpy(weight, "weight"), _numpy(bias, "bias"),
                      *_core(*geometry), activation=activation,
                      residual=_numpy(residual, "residual"))
    return _formatted(torch.from_numpy(y), _memory_format(input, weight))


_conv2d_op = torch.library.custom_op("clconv::conv2d", mutates_args=(), schema=(
    f"(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, str? activation, "
    f"{_GEOMETRY}) -> Tensor"))(_conv2d_kernel)


@_conv2d_op.register_fake
def _(input, weight, bias, residual, activation, *geometry):
    _check(residual, "residual")
    shape = _output_shape(input, weight, bias, *geometry)
    return _formatted(input.new_empty(shape), _memory_format(input, weight))


def _input_grad_kernel(input_shape, weight, grad_output, *geometry):
    return torch.from_numpy(clconv.conv2d_input_grad(
        tuple(input_shape), _numpy(weight, "weight"), _numpy(grad_output, "grad_output"),
        *_core(*geometry)))


_input_grad_op = torch.library.custom_op("clconv::conv2d_input_grad", mutates_args=(), schema=(
    f"(int[] input_shape, Tensor weight, Tensor grad_output, {_GEOMETRY}) -> Tensor"))(
        _input_grad_kernel)


@_input_grad_op.register_fake
def _(input_shape, weight, grad_output, *geometry):
    _check(weight, "weight"), _check(grad_output, "grad_output")
    return weight.new_empty(input_shape)


def _weight_grad_kernel(input, weight_shape, grad_output, *geometry):
    return torch.from_numpy(clconv.conv2d_weight_grad(
        _numpy(input, "input"), tuple(weight_shape), _numpy(grad_output, "grad_output"),
        *_core(*geometry)))


_weight_grad_op = torch.library.custom_op("clconv::conv2d_weight_grad", mutates_args=(),
                                          schema=(f"(Tensor input, int[] weight_shape, Tensor "
                                                  f"grad_output, {_GEOMETRY}) -> Tensor"))(
    _weight_grad_kernel)


@_weight_grad_op.register_fake
def _(input, weight_shape, grad_output, *geometry):
    _check(input, "input"), _check(grad_output, "grad_output")
    return input.new_empty(weight_shape)


def _bias_grad_kernel(grad_output):
    return torch.from_numpy(clconv.conv2d_bias_grad(_numpy(grad_output, "grad_output")))


_bias_grad_op = torch.library.custom_op("clconv::conv2d_bias_grad", mutates_args=(), schema=(
    "(Tensor grad_output) -> Tensor"))(_bias_grad_kernel)


@_bias_grad_op.register_fake
def _(grad_output):
    _check(grad_output, "grad_output")
    return grad_output.new_empty(grad_output.shape[-3])


# Tensor types the eager fast path takes as they are (a subclass may dispatch on its own).
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def _recording(tensors):
    """Whether autograd records a call on tensors."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _dispatch(op, kernel, tensors, *args, recorded=None):
    """op(*args), or its kernel(*args) directly where nothing would see the operator.
    recorded: with the op's autograd.Function, the call for when autograd records and
    nothing else would see the operator (else op)."""
    recording = _recording(tensors)
    if not _unobserved(tensors):
        return op(*args)
    if recording:
        return (recorded or op)(*args)
    return kernel(*args)


def _unobserved(tensors):
    """Whether a call that autograd does not record may run a clconv operator's kernel
    without torch's dispatcher (~70 µs a call): nothing else would see the operator, i.e. no
    tracing, compiling, profiler, torch function or dispatch mode (FakeTensorMode, a
    FlopCounter ...) or functorch transform is active, and every tensor is a plain one.
    Unsure (a private query missing in this torch): no."""
    if any(t is not None and type(t) not in _PLAIN_TENSORS for t in tensors):
        return False
    try:
        return not (torch.jit.is_tracing() or torch.compiler.is_compiling()
                    or torch.autograd._profiler_enabled()
                    or torch._C._len_torch_dispatch_stack()
                    or torch._C._is_torch_function_mode_enabled()
                    or torch._C._are_functorch_transforms_active())
    except AttributeError:
        return False


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, activation, *geometry = inputs
    if activation is not None:
        raise RuntimeError("clconv::conv2d has no gradient for a fused activation: apply it "
                           "with torch after the convolution (clconv.torch.conv2d does this "
                           "when autograd records)")
    ctx.geometry, ctx.n_inputs = geometry, len(inputs)
    ctx.memory_format = _memory_format(input, weight)
    ctx.save_for_backward(input, weight)


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = [None] * ctx.n_inputs
    if needs[3]:
        grads[3] = grad_output          # a fused residual has exactly the output's shape
    tensors = (input, weight, grad_output)
    if not _recording(tensors) and _unobserved(tensors):
        # What the gradient operators' kernels compute, in one call that waits once.
        results = clconv.conv2d_backward(
            _numpy(input, "input"), _numpy(weight, "weight"),
            _numpy(grad_output, "grad_output"), *_core(*ctx.geometry),
            output_mask=tuple(needs[:3]))
        grads[:3] = [None if r is None else torch.from_numpy(r) for r in results]
        for i in (0, 1):
            if grads[i] is not None:
                grads[i] = _formatted(grads[i], ctx.memory_format)
        return tuple(grads)
    if needs[0]:
        grads[0] = _formatted(_dispatch(_input_grad_op, _input_grad_kernel,
                                        (weight, grad_output), list(input.shape), weight,
                                        grad_output, *ctx.geometry), ctx.memory_format)
    if needs[1]:
        grads[1] = _formatted(_dispatch(_weight_grad_op, _weight_grad_kernel,
                                        (input, grad_output), input, list(weight.shape),
                                        grad_output, *ctx.geometry), ctx.memory_format)
    if needs[2]:
        grads[2] = _dispatch(_bias_grad_op, _bias_grad_kernel, (grad_output,), grad_output)
    return tuple(grads)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("clconv.torch: double backward (the gradient of a gradient of "
                       "clconv::conv2d) is not supported")


_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
for _op in (_input_grad_op, _weight_grad_op, _bias_grad_op):
    _op.register_autograd(_no_double_backward)


class _RecordedConv2d(torch.autograd.Function):
    """clconv::conv2d's autograd without the dispatcher, for a recorded call nothing else
    sees (_unobserved): the registered operator's own context and backward, without its
    ~0.3 ms a call of dispatch and argument handling (forward and backward together)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _conv2d_kernel(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return _backward(ctx, grad_output)


class Conv2dFunction:
    """apply(input, weight, bias, stride, padding, dilation, groups, padding_mode): the
    clconv::conv2d operator, under the name of the autograd.Function it replaced."""

    @staticmethod
    def apply(input, weight, bias, stride=1, padding=0, dilation=1, groups=1,
              padding_mode="zeros"):
        return _conv2d_op(input, weight, bias, None, None,
                          *_geometry(stride, padding, dilation, groups, padding_mode))


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           padding_mode="zeros", activation=None, residual=None):
    """activation(conv2d(input, weight, bias) + residual), the convolution run by clconv.

    activation: None, "relu", "relu6", "silu" or "gelu" (erf form, torch's default).
    residual: None or anything torch adds to the output (broadcast, type promotion).
    """
    _check_activation(activation)
    geometry = _geometry(stride, padding, dilation, groups, padding_mode)
    # The kernel adds a residual only element by element, in the output's dtype.
    fuse_residual = residual is None or (
        isinstance(residual, torch.Tensor)
        and residual.shape == _output_shape(input, weight, bias, *geometry)
        and residual.dtype == input.dtype)
    tensors = (input, weight, bias, residual)
    fuse_activation = fuse_residual and not _recording(tensors)
    y = _dispatch(_conv2d_op, _conv2d_kernel, tensors, input, weight, bias,
                  residual if fuse_residual else None,
                  activation if fuse_activation else None, *geometry,
                  recorded=_RecordedConv2d.apply)
    if not fuse_residual:
        y = y + residual
    if activation is not None and not fuse_activation:
        y = ACTIVATIONS[activation](y)
    return y


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d whose convolution runs on clconv's OpenCL device.

    Same constructor (plus `activation=`, applied after the convolution, fused into its
    kernel at inference), parameters, initialisation and state_dict as torch.nn.Conv2d.
    forward(input, residual=None) computes activation(conv(input) + residual).
    """

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _check_activation(activation)
        # convert's training fusion: (the BatchNorm2d that always follows,), in a tuple so
        # that it is no submodule of this one (state_dict keys stay torch's).
        self._batch_norm = ()

    def _conv_forward(self, input, weight, bias, activation=None, residual=None):
        # padding_mode goes to clconv as is: it pads where the kernel reads, no padded copy.
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                      self.groups, self.padding_mode, activation=activation, residual=residual)

    def forward(self, input, residual=None):
        if self._batch_norm and residual is None and _fuses_batch_norm(self, input):
            return _conv_batch_norm(self, self._batch_norm[0], input)
        return self._conv_forward(input, self.weight, self.bias, self.activation, residual)

    def __setstate__(self, state):
        state.setdefault("_batch_norm", ())     # pickled before the field existed
        super().__setstate__(state)

    def extra_repr(self):
        s = super().extra_repr()
        return s if self.activation is None else f"{s}, activation={self.activation!r}"

    def _geometry(self):
        return _geometry(self.stride, self.padding, self.dilation, self.groups,
                         self.padding_mode)

    @classmethod
    def from_torch(cls, module, activation=None):
        """A Conv2d with the configuration, training flag and a copy of the weights of a
        torch.nn.Conv2d."""
        new = cls.like(module, module.bias is not None, activation)
        new.load_state_dict(module.state_dict())
        return new.train(module.training)

    @classmethod
    def like(cls, module, bias, activation=None):
        """A new Conv2d (fresh parameters) with module's configuration, device and dtype."""
        return cls(module.in_channels, module.out_channels, module.kernel_size,
                   stride=module.stride, padding=module.padding, dilation=module.dilation,
                   groups=module.groups, bias=bias, padding_mode=module.padding_mode,
                   device=module.weight.device, dtype=module.weight.dtype,
                   activation=activation)


class BatchNorm2d(nn.BatchNorm2d):
    """torch.nn.BatchNorm2d followed by an activation (None, "relu", "relu6", "silu" or
    "gelu"): same constructor (plus `activation=`), parameters, buffers and state_dict.

    convert(model) in training mode puts one in the place of each torch BatchNorm2d that
    alone takes a convolution's output. In training the convolution before it (a Conv2d whose
    BatchNorm this is) computes both on clconv's device, in one call each way
    (clconv.conv2d_batch_norm and its backward), and this module passes that output on;
    in eval mode, or on any input that convolution did not normalise, it is torch's
    BatchNorm2d and then the activation. (So, as with a fused activation, the paired
    convolution called on its own in training returns the normalised output.)
    """

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _check_activation(activation)

    def forward(self, input):
        if getattr(input, "_clconv_normalized_by", None) is self:
            return input
        out = super().forward(input)
        return out if self.activation is None else ACTIVATIONS[self.activation](out)

    def extra_repr(self):
        s = super().extra_repr()
        return s if self.activation is None else f"{s}, activation={self.activation!r}"

    @classmethod
    def sharing(cls, module, activation=None):
        """A BatchNorm2d with the configuration, training flag, Parameter objects and
        buffers (the same tensors) of a torch.nn.BatchNorm2d."""
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats, activation=activation, device="meta")
        for name, tensor in itertools.chain(module.named_parameters(recurse=False),
                                            module.named_buffers(recurse=False)):
            setattr(new, name, tensor)
        return new.train(module.training)


def _fuses_batch_norm(conv, input):
    """Whether conv's forward on input also computes its BatchNorm (conv._batch_norm) on
    the device: in training, plain contiguous 4-D float32/float64 CPU tensors throughout,
    nothing observing (_unobserved) and no hooks on either module (a hook would see the
    normalised output as the convolution's), at least two values per channel. Else the
    convolution runs alone and the BatchNorm module after it computes as torch does."""
    bn = conv._batch_norm[0]
    if not (bn.training and conv.activation is None and isinstance(input, torch.Tensor)):
        return False
    tensors = (input, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
               bn.running_var)
    if not (input.dim() == 4 and input.dtype in (torch.float32, torch.float64)
            and all(t is None or (t.device.type == "cpu" and t.dtype == input.dtype
                                  and t.is_contiguous()) for t in tensors)
            and (bn.running_mean is not None or not bn.track_running_stats)
            and _unobserved(tensors) and not _hooked((conv, bn))):
        return False
    return _values_per_channel(conv, input) > 1


def _values_per_channel(conv, input):
    """N x H_out x W_out of conv on input (checked as the call checks it), memoised by
    shapes and geometry: computing the output shape costs ~30 µs a call."""
    key = (tuple(input.shape), tuple(conv.weight.shape), conv.bias is None, conv.stride,
           conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    count = _counts.get(key)
    if count is None:
        n, _, h, w = _output_shape(input, conv.weight, conv.bias, *conv._geometry())
        if len(_counts) >= _FORMATS_KEPT:
            _counts.clear()
        count = _counts[key] = n * h * w
    return count


_counts = {}    # _values_per_channel's answers


def _conv_batch_norm(conv, bn, input):
    """bn(conv(input)) in training, with torch's bookkeeping of the running statistics."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:      # a cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    out = _ConvBatchNorm.apply(input, conv.weight, conv.bias, bn.weight, bn.bias,
                               bn.running_mean, bn.running_var, momentum, bn.eps,
                               bn.activation, conv._geometry())
    out._clconv_normalized_by = bn
    return out


class _ConvBatchNorm(torch.autograd.Function):
    """clconv.conv2d_batch_norm and its backward as one autograd node."""

    @staticmethod
    def forward(ctx, input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                momentum, eps, activation, geometry):
        z, y, mean, invstd = clconv.conv2d_batch_norm(
            *(None if t is None else t.detach().numpy()
              for t in (input, weight, bias, bn_weight, bn_bias, running_mean, running_var)),
            *_core(*geometry), momentum=momentum, eps=eps, activation=activation)
        ctx.geometry, ctx.activation = geometry, activation
        ctx.save_for_backward(input, weight, torch.from_numpy(y), torch.from_numpy(mean),
                              torch.from_numpy(invstd), bn_weight, bn_bias)
        return torch.from_numpy(z)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, weight, y, mean, invstd, bn_weight, bn_bias = ctx.saved_tensors
        grads = clconv.conv2d_batch_norm_backward(
            *(None if t is None else t.detach().numpy()
              for t in (input, weight, y, mean, invstd, bn_weight, bn_bias)),
            _numpy(grad_output, "grad_output"), *_core(*ctx.geometry),
            activation=ctx.activation, output_mask=tuple(ctx.needs_input_grad[:5]))
        return (*(None if g is None else torch.from_numpy(g) for g in grads),) + (None,) * 6


class ConvChain(nn.Module):
    """A run of convolutions that convert's inference graph runs as one call: their
    intermediate results stay on clconv's device, each kernel is enqueued after the one
    before, and the call waits once at the end (per convolution that saves a trip of its
    result to torch and back: ~0.1-0.2 ms a call on PoCL). On a CPU device the inputs and
    weights are read in place and the outputs written into the tensors returned. The
    intermediate results' device buffers are reused within a call and kept for the next
    one (as many as were alive at once; they go with the module).

    convs: the Conv2d modules in order; steps: per convolution (input, residual) as indices
    into the values (the chain's inputs, then each convolution's output; residual -1: none);
    outputs: the values returned (one: a tensor, more: a tuple). A call runs each
    convolution's own forward instead wherever the chain could differ from it: autograd
    recording, anything observing the call (tracing, compiling, modes), module hooks,
    channels_last or non-contiguous tensors, a residual that torch would broadcast, or a
    call that would fail (so that it fails with the convolution's own error)."""

    def __init__(self, convs, steps, outputs):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.steps, self.outputs = tuple(steps), tuple(outputs)
        # the step after which each value is read no more
        self._last_use = {j: k for k, step in enumerate(self.steps) for j in step if j >= 0}
        self._params, self._programs, self._arenas = {}, {}, []

    def forward(self, *inputs):
        program = self._program(inputs)
        if program is not None:
            results = self._run(program, inputs)
        else:
            values = list(inputs)
            for conv, (i, r) in zip(self.convs, self.steps):
                values.append(conv(values[i]) if r < 0 else conv(values[i], residual=values[r]))
            results = [values[k] for k in self.outputs]
        return results[0] if len(results) == 1 else tuple(results)

    def _program(self, inputs):
        """(queue, params, per convolution (problem, epilogue, output shape)) for running
        the chain on the device, or None where the convolutions' own forwards must run."""
        tensors = inputs + tuple(p for conv in self.convs for p in (conv.weight, conv.bias))
        if _recording(tensors) or not _unobserved(tensors) or _hooked(self.convs):
            return None
        queue = clconv.queue_for()
        device_params = self._device_params(queue)
        key = (queue,) + tuple((tuple(t.shape), t.dtype, t.is_contiguous()) for t in inputs)
        if key not in self._programs:
            if len(self._programs) >= _FORMATS_KEPT:
                self._programs.clear()
            self._programs[key] = self._problems(queue, inputs)
        problems = self._programs[key]
        return None if problems is None else (queue, device_params, problems)

    def _problems(self, queue, inputs):
        """Per convolution (problem, epilogue, output shape) when each convolution's own
        forward would run without error, fuse its residual and keep torch's contiguous
        format on inputs (then the chain computes the same, bit for bit), else None."""
        values = []
        for t in inputs:
            if not (t.device.type == "cpu" and t.dtype in _DTYPES and t.is_contiguous()):
                return None
            values.append((tuple(t.shape), t.dtype))
        problems = []
        for conv, (i, r) in zip(self.convs, self.steps):
            shape, dtype = values[i]
            weight, bias = conv.weight, conv.bias
            try:
                problem, unbatched = _problem(shape, dtype, weight, bias, *conv._geometry())
                check_device_limits(problem, queue.device)
            except (TypeError, ValueError):
                return None
            out = problem.output_shape[1:] if unbatched else problem.output_shape
            meta = torch.empty(shape, dtype=dtype, device="meta")
            if (_memory_format(meta, weight) != torch.contiguous_format
                    or not weight.is_contiguous()
                    or bias is not None and not bias.is_contiguous()
                    or r >= 0 and values[r] != (tuple(out), dtype)):
                return None
            values.append((tuple(out), dtype))
            epilogue = (("activation", conv.activation), ("has_residual", r >= 0))
            problems.append((problem, epilogue, tuple(out)))
        return problems

    def _device_params(self, queue):
        """Per convolution the (buffer, offset) pairs of its weight and bias (None: no bias),
        remade for a tensor whose memory or version changed. A change of shape, dtype or
        strides (or a bias added or removed) also drops the chain's programs, which were
        checked against the old ones."""
        pairs = []
        for conv in self.convs:
            params = (conv.weight, conv.bias)
            layout = tuple(None if p is None else (p.shape, p.dtype, p.stride()) for p in params)
            key = (queue, layout) + tuple(None if p is None else (p.data_ptr(), p._version)
                                          for p in params)
            found = self._params.get(id(conv))
            if found is None or found[0] != key:
                if found is not None and found[0][:2] != key[:2]:
                    self._programs.clear()
                found = self._params[id(conv)] = (key, [
                    None if p is None else arrays.operand(queue, p.detach().numpy(),
                                                          arrays.shares_host_memory(queue),
                                                          "chain_param")
                    for p in params])
            pairs.append([None if p is None else p[:2] for p in found[1]])
        return pairs

    def _run(self, program, inputs):
        queue, params, problems = program
        shared = arrays.shares_host_memory(queue)
        # An intermediate's buffer takes a later result once its last reader is enqueued:
        # on an in-order queue that kernel runs after the readers. Between calls the buffers
        # wait in an arena (fresh memory would be page-faulted in by every call: 25 MB took
        # 3 ms more to write, resnet50 batch 8 holds 70 results).
        in_order = scratch.of(queue).in_order
        arena = self._take_arena(queue)
        outputs, events, owned = {}, {}, {}
        try:
            values = [arrays.operand(queue, t.detach().numpy(), shared, f"chain{i}")
                      for i, t in enumerate(inputs)]
            for k, ((i, r), (weight, bias), (problem, epilogue, shape)) in enumerate(
                    zip(self.steps, params, problems)):
                index = len(values)
                if index in self.outputs:
                    result = outputs[index] = np.empty(shape, problem.numpy_dtype)
                    buffer = arrays.output_buffer(queue, result)
                else:
                    nbytes = math.prod(shape) * problem.numpy_dtype.itemsize
                    free = arena.setdefault(nbytes, [])
                    buffer = owned[index] = free.pop() if free else self._new_buffer(queue,
                                                                                     nbytes)
                operands = [values[i][:2], weight] + ([bias] if bias else []) + (
                    [values[r][:2]] if r >= 0 else [])
                waits = [e for j in (i, r) if j in events for e in events[j][-1:]]
                events[index] = functional.enqueue(problem, queue, "forward", operands,
                                                   (buffer, 0), epilogue, waits or None)
                values.append((buffer, 0))
                for j in (i, r):     # OpenCL frees a released buffer once its kernels are done
                    if j >= 0 and self._last_use[j] == k and j not in self.outputs:
                        values[j] = None
                        if in_order and j in owned:
                            arena[owned[j].size].append(owned.pop(j))
            arrays.to_host(queue, [(values[k][0], outputs[k], events[k][-1:])
                                   for k in self.outputs])
        finally:
            queue.finish()      # the inputs' memory is read in place until here
            for buffer in owned.values():
                arena.setdefault(buffer.size, []).append(buffer)
            self._arenas.append((queue, arena))
        return [torch.from_numpy(outputs[k]) for k in self.outputs]

    def _take_arena(self, queue):
        """Free intermediate buffers of an earlier call on queue ({bytes: [buffers]}), for
        this call alone (a call in another thread takes another)."""
        while self._arenas:
            try:
                owner, arena = self._arenas.pop()
            except IndexError:      # another thread took the last one
                break
            if owner is queue:
                return arena
        return {}

    @staticmethod
    def _new_buffer(queue, nbytes):
        return cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, nbytes)

    def __getstate__(self):
        # OpenCL objects do not pickle or copy: a copy makes its own
        state = super().__getstate__().copy()
        state["_params"], state["_programs"], state["_arenas"] = {}, {}, []
        return state

    def extra_repr(self):
        return f"steps={self.steps}, outputs={self.outputs}"


def _hooked(modules):
    """Whether a forward would run hooks: the modules' own or torch's global ones (unsure, a
    private query missing in this torch: yes)."""
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return True
    try:
        from torch.nn.modules import module
        return bool(module._global_forward_hooks or module._global_forward_pre_hooks)
    except AttributeError:
        return True


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


def convert(model, fuse=True, fold_batchnorm=True):
    """Replace every torch.nn.Conv2d of model (recursively) by clconv.torch.Conv2d, in place,
    keeping the Parameter objects (an optimiser holding them keeps working) and the training
    flag; forward hooks of the replaced modules are not carried over. Returns the model (a new
    module if model itself is an nn.Conv2d), or in eval mode its fused graph (below).

    fuse: in an nn.Sequential (whose forward feeds each module's output only to the next), a
    convolution followed by nn.ReLU, nn.ReLU6, nn.SiLU or nn.GELU() (erf form) takes the
    activation into its kernel and the activation module becomes nn.Identity. In train
    mode, a convolution followed by an nn.BatchNorm2d of its channels (and maybe such an
    activation, which becomes nn.Identity) is paired with it instead, and so, in a model
    torch.fx traces, is each convolution whose output only a BatchNorm2d takes (each module
    called once; the activation module after it when that is the only use): the BatchNorm
    becomes a BatchNorm2d of this module sharing its parameters and buffers, and in training
    the convolution computes both in one call each way (see BatchNorm2d).

    In eval mode (model.training False) with fuse, convert also traces the converted model
    with torch.fx and returns a new torch.fx.GraphModule for inference, in which
    - (fold_batchnorm) an eval-mode BatchNorm2d whose input is only a convolution's output
      is folded into a copy of that convolution: weight * gamma / sqrt(var + eps) and bias
      (bias - mean) * gamma / sqrt(var + eps) + beta, computed in float64 and rounded once
      to the weight's dtype, so results differ from conv-then-BatchNorm by float rounding
      (about 1e-6 relative in float32), not bitwise. Such a graph cannot be put back in
      train mode (train() raises): convert the model in train mode to train it;
    - a convolution's output used only by an addition (x + y, torch.add, +=) takes the other
      operand as its fused residual, and an activation (module or function: relu, relu6,
      silu, erf gelu) applied only to it, or to that sum, runs in the convolution's store;
    - each run of two or more consecutive convolution calls becomes one ConvChain module
      (chain0, chain1, ..., owning those convolutions; the folded BatchNorms and other
      modules the graph no longer calls are removed), which keeps the intermediate results
      on the device and waits once per call.
    The model itself is only converted in place (its BatchNorms and parameters untouched);
    a model torch.fx cannot trace (data-dependent control flow) is returned as converted in
    place, with a warning.
    """
    if _convertible(model):
        return _swap(model)
    _convert_in_place(model, fuse, model.training)
    if fuse and not model.training:
        return _fused_graph(model, fold_batchnorm)
    if fuse:
        _pair_traced_batch_norms(model)
    return model


def _convert_in_place(model, fuse, training):
    children = list(model.named_children())
    sequential = (fuse and isinstance(model, nn.Sequential)
                  and type(model).forward is nn.Sequential.forward)
    for i, (name, child) in enumerate(children):
        if not _convertible(child):
            _convert_in_place(child, fuse, training)
            continue
        following = children[i + 1:i + 3] if sequential else []
        if training and following and _normalizes(child, following[0][1]):
            _fuse_batch_norm(model, name, child, following)
            continue
        activation = _fusable(following[0][1]) if following else None
        if activation is not None:
            setattr(model, following[0][0], nn.Identity())
        setattr(model, name, _swap(child, activation))


def _normalizes(conv, module):
    """Whether module is a torch.nn.BatchNorm2d of conv's output channels."""
    return type(module) is nn.BatchNorm2d and module.num_features == conv.out_channels


def _fuse_batch_norm(model, name, conv, following):
    """In model (a Sequential), the convolution conv (child name), the BatchNorm2d after
    it and a fusable activation after that, if any: one clconv Conv2d and BatchNorm2d
    computed together in training (BatchNorm2d's docstring); the activation becomes
    nn.Identity. Parameters and buffers stay the same objects."""
    (bn_name, bn), *rest = following
    activation = _fusable(rest[0][1]) if rest else None
    if activation is not None:
        setattr(model, rest[0][0], nn.Identity())
    new = _swap(conv)
    setattr(model, bn_name, _paired(new, bn, activation))
    setattr(model, name, new)


def _paired(conv, bn, activation):
    """A BatchNorm2d sharing bn's parameters and buffers, taking the activation, that the
    clconv Conv2d conv computes with it in training (BatchNorm2d's docstring)."""
    new = BatchNorm2d.sharing(bn, activation)
    conv._batch_norm = (new,)
    return new


def _pair_traced_batch_norms(model):
    """Pair, as _fuse_batch_norm does in an nn.Sequential, each convolution whose output only
    an nn.BatchNorm2d takes, wherever the graph torch.fx traces of model has them (a ResNet
    block's conv1 and bn1), each module called once; the activation module after the
    BatchNorm too when that is its output's only use and the module is called only there.
    An untraceable model keeps the pairs of its Sequentials."""
    try:
        graph = _Tracer().trace(model)
    except Exception:      # noqa: BLE001 - fx raises many kinds on untraceable code
        return
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")

    def called_once(node, types):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1:
            return None
        module = model.get_submodule(node.target)
        return module if type(module) in types and not node.kwargs else None
    for node in graph.nodes:
        bn = called_once(node, (nn.BatchNorm2d,))
        source = node.args[0] if bn is not None else None
        conv = (called_once(source, (Conv2d,)) if isinstance(source, torch.fx.Node)
                and len(source.users) == 1 else None)
        if conv is None or conv._batch_norm or conv.activation is not None \
                or not _normalizes(conv, bn):
            continue
        user = next(iter(node.users)) if len(node.users) == 1 else None
        act = user is not None and called_once(user, tuple(_FUSABLE))
        activation = _fusable(act) if act else None
        if activation is not None:
            _set_submodule(model, user.target, nn.Identity())
        _set_submodule(model, node.target, _paired(conv, bn, activation))


def _set_submodule(root, target, module):
    """Put module at the dotted path target of root."""
    *parent, name = target.split(".")
    setattr(root.get_submodule(".".join(parent)), name, module)


# --- the inference graph: BatchNorm folding, fused residuals and activations ------------

class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with clconv's Conv2d and BatchNorm2d leaves (call_module nodes)
    like torch's own."""

    def is_leaf_module(self, module, qualified_name):
        return (isinstance(module, (Conv2d, BatchNorm2d))
                or super().is_leaf_module(module, qualified_name))


_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu",
                         F.relu6: "relu6", F.silu: "silu", F.gelu: "gelu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
_ADDITIONS = {operator.add, operator.iadd, torch.add}


def _fused_graph(model, fold_batchnorm):
    try:
        graph = _Tracer().trace(model)
    except Exception as err:     # noqa: BLE001 - fx raises many kinds on untraceable code
        warnings.warn(f"clconv.torch.convert: torch.fx cannot trace {type(model).__name__} "
                      f"({type(err).__name__}: {err}); it is converted without BatchNorm "
                      "folding and graph fusion", stacklevel=3)
        return model
    fused = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    rewrite = _GraphRewrite(fused)
    folded = fold_batchnorm and rewrite.fold_batchnorms()
    rewrite.fuse_epilogues()
    rewrite.chain_convolutions()
    graph.lint()
    fused.delete_all_unused_submodules()    # the folded BatchNorms, the chains' old places
    fused.recompile()
    if folded:      # GraphModule gives each instance a class of its own
        type(fused).train = _inference_only_train
    return fused.eval()


def _inference_only_train(self, mode=True):
    if mode:
        raise RuntimeError("clconv.torch.convert folded BatchNorm into this model's "
                           "convolutions for inference; to train, convert the model in train "
                           "mode (or with fold_batchnorm=False)")
    return nn.Module.train(self, False)


class _GraphRewrite:
    """The rewrites of a traced, converted model's graph. Only a convolution module called
    once in the graph, with no activation or residual yet, takes a BatchNorm, a residual or
    an activation, and only when its output (or the sum) has no other use. The rewritten
    convolutions are new modules in the GraphModule (sharing the Parameter objects where
    nothing is folded), so the traced model's own modules never change."""

    def __init__(self, module):
        self.module, self.graph = module, module.graph
        self.calls = collections.Counter(n.target for n in self.graph.nodes
                                         if n.op == "call_module")

    def _module(self, node):
        return self.module.get_submodule(node.target) if node.op == "call_module" else None

    def _bare_conv(self, node):
        """The Conv2d that node calls, if node is a convolution that may take more (called
        once, its output used once, no activation or residual yet), else None."""
        module = self._module(node)
        if (isinstance(module, Conv2d) and self.calls[node.target] == 1 and len(node.users) == 1
                and module.activation is None and len(node.args) == 1 and not node.kwargs):
            return module
        return None

    def _replace(self, node, module):
        _set_submodule(self.module, node.target, module)

    def fold_batchnorms(self):
        """Fold each eval BatchNorm2d after a bare convolution; whether any was folded."""
        folded = False
        for node in list(self.graph.nodes):
            bn = self._module(node)
            if not (type(bn) in (nn.BatchNorm2d, BatchNorm2d) and not bn.training
                    and bn.running_mean is not None and len(node.args) == 1):
                continue
            conv_node = node.args[0]
            conv = self._bare_conv(conv_node) if isinstance(conv_node, torch.fx.Node) else None
            if conv is None:
                continue
            self._replace(conv_node, _folded(conv, bn, getattr(bn, "activation", None)))
            node.replace_all_uses_with(conv_node)
            self.graph.erase_node(node)
            folded = True
        return folded

    def fuse_epilogues(self):
        """Fuse residual additions and activations into the convolutions before them."""
        for node in list(self.graph.nodes):
            if node.graph is not self.graph:    # erased by an earlier fusion
                continue
            conv_node, residual = self._conv_and_residual(node)
            if conv_node is None:
                continue
            last, activation = node, None
            if len(node.users) == 1:
                user = next(iter(node.users))
                activation = self._activation(user)
                last = user if activation else node
            if residual is None and activation is None:
                continue
            conv = self.module.get_submodule(conv_node.target)
            self._replace(conv_node, _swap(conv, activation))
            with self.graph.inserting_before(last):
                new = self.graph.call_module(
                    conv_node.target, conv_node.args,
                    {} if residual is None else {"residual": residual})
            last.replace_all_uses_with(new)
            for dead in dict.fromkeys([last, node, conv_node]):
                self.graph.erase_node(dead)

    def chain_convolutions(self):
        """Put each run of two or more consecutive convolution nodes into one ConvChain
        node (a module of the graph, chain0, chain1, ..., owning the convolutions): the run
        takes the values it uses from before it as inputs and returns those used after it."""
        runs, run = [], []
        for node in self.graph.nodes:
            if self._chainable(node):
                run.append(node)
                continue
            if len(run) > 1:
                runs.append(run)
            run = []
        names = (f"chain{n}" for n in itertools.count())
        for run in runs:
            self._chain(run, next(n for n in names if not hasattr(self.module, n)))

    def _chainable(self, node):
        module = self._module(node)
        return (isinstance(module, Conv2d) and self.calls[node.target] == 1
                and len(node.args) == 1 and isinstance(node.args[0], torch.fx.Node)
                and set(node.kwargs) <= {"residual"}
                and all(isinstance(v, torch.fx.Node) for v in node.kwargs.values()))

    def _chain(self, run, name):
        inside = set(run)
        index, inputs, steps = {}, [], []
        for node in run:
            for value in (node.args[0], node.kwargs.get("residual")):
                if value is not None and value not in inside and value not in index:
                    index[value] = len(inputs)
                    inputs.append(value)
        for k, node in enumerate(run):
            residual = node.kwargs.get("residual")
            steps.append((index[node.args[0]], -1 if residual is None else index[residual]))
            index[node] = len(inputs) + k
        outputs = [node for node in run if any(user not in inside for user in node.users)]
        if not outputs:         # dead code in the traced graph: left as traced
            return
        chain = ConvChain([self._module(node) for node in run], steps,
                          [index[node] for node in outputs])
        self.module.add_module(name, chain)
        with self.graph.inserting_before(run[0]):
            call = self.graph.call_module(name, tuple(inputs))
        if len(outputs) == 1:
            outputs[0].replace_all_uses_with(call)
        else:
            last = call
            for k, node in enumerate(outputs):
                with self.graph.inserting_after(last):
                    last = self.graph.call_function(operator.getitem, (call, k))
                node.replace_all_uses_with(last)
        for node in reversed(run):
            target = node.target
            self.graph.erase_node(node)
            self.module.delete_submodule(target)

    def _conv_and_residual(self, node):
        """(convolution node, residual node or None) when node is a bare convolution (then no
        residual) or an addition of a bare convolution's output and another tensor."""
        if self._bare_conv(node) is not None:
            return node, None
        if not (node.target in _ADDITIONS and node.op == "call_function"
                or node.op == "call_method" and node.target in ("add", "add_")):
            return None, None
        if len(node.args) != 2 or node.kwargs:      # alpha= or out=: torch adds
            return None, None
        for conv_node, residual in (node.args, node.args[::-1]):
            if (isinstance(conv_node, torch.fx.Node) and isinstance(residual, torch.fx.Node)
                    and residual is not conv_node and self._bare_conv(conv_node) is not None):
                return conv_node, residual
        return None, None

    def _activation(self, node):
        """The name of the activation node applies to its one input, if fusable, else None."""
        if node.op == "call_module":
            return _fusable(self._module(node)) if len(node.args) == 1 else None
        if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
            extra = dict(node.kwargs)
            extra.pop("inplace", None)
            if node.target is F.gelu and extra.pop("approximate", "none") != "none":
                return None
            return _ACTIVATION_FUNCTIONS[node.target] if len(node.args) == 1 and not extra \
                else None
        if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
            return _ACTIVATION_METHODS[node.target] if len(node.args) == 1 else None
        return None


def _folded(conv, bn, activation=None):
    """A copy of conv computing activation(bn(conv(x))) with bn in eval mode."""
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    new = Conv2d.like(conv, bias=True, activation=activation)
    dtype = conv.weight.dtype
    with torch.no_grad():
        new.weight.copy_((conv.weight.detach().double() * scale.view(-1, 1, 1, 1)).to(dtype))
        new.bias.copy_(shift.to(dtype))
    return new.eval()

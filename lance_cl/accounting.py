"""Activation memory, measured and analytic, peak memory of a step, and per-layer FLOPs (docs/core.md, docs/memory.md).

Measured bytes are the storages autograd really keeps for backward in one training step,
seen through ``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by storage, so a view
of a large tensor counts as the large tensor (a truncated view keeps all of it alive).
Parameters are not activations and are excluded; factor buffers are counted once.

The peak step memory (:func:`measure_peak_step_memory`, ``peak_bytes`` of
:func:`measure_activation_memory`) is the most bytes allocated at any moment of one step
(forward, loss, backward) beyond what was allocated when the step began: saved and transient
activations, the output and the loss, autograd's gradient buffers, the parameters' ``.grad``
tensors (fresh: existing ones are set aside for the step and put back afterwards) and every
temporary of the compression code, forward or backward. Parameters, buffers, the inputs and
anything else alive before the step are the baseline, not counted. On CUDA it comes from the
caching allocator's statistics (``max_memory_allocated`` - ``memory_allocated`` at the start,
block sizes rounded up by the allocator); on CPU from the allocation events of the PyTorch
profiler (``profile_memory=True``): a running sum of +bytes / -bytes in time order, whose
maximum is the peak (requested sizes, no allocator overhead).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .layers import CompressedLayer, compressed_type_for
from .units import format_bytes  # noqa: F401  (its home before lance_cl.units; kept importable)


def measure_activation_memory(model: nn.Module, inputs: Any, loss_fn: Callable[[Any], Tensor],
                              layers: Optional[Sequence[str]] = None,
                              count_buffers: bool = True, peak: bool = True) -> dict[str, Any]:
    """Run one forward + backward and account every tensor autograd saved.

    inputs: what ``model`` takes (a tensor, or a tuple of positional arguments);
    loss_fn(output) -> scalar. Returns ``{"total": bytes, "per_layer": {module name: bytes},
    "selected": bytes over ``layers`` (default: the compressed layers), "buffers": bytes of saved
    buffers, "peak_bytes": peak step bytes or None, "cuda_peak": bytes or None}``.
    A saved tensor belongs to every module that saved it (the innermost module whose forward was
    running; "" = the model's own forward code): per-layer figures may overlap (a ReLU and the
    next conv save the same storage), ``total`` and ``selected`` count each storage once.

    ``peak_bytes`` is measured in the same pass (see :func:`measure_peak_step_memory`; the hooks
    allocate nothing: the pack hook returns the tensor itself), None when ``peak=False`` or the
    profiler is unavailable. ``cuda_peak`` (CUDA only) is the peak of the forward alone, above
    the bytes allocated when it began. The parameters' ``.grad`` are as before the call.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buffer_storages = {b.untyped_storage().data_ptr() for b in model.buffers()}
    skip = param_storages if count_buffers else param_storages | buffer_storages
    stack: list[str] = [""]
    handles = []

    def enter(name: str) -> Callable:
        def hook(module, args) -> None:
            stack.append(name)
        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    sizes: dict[tuple, int] = {}
    owners: dict[tuple, set[str]] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and storage.nbytes() > 0:
            key = (t.device.type, t.device.index, ptr)
            sizes[key] = max(sizes.get(key, 0), storage.nbytes())
            owners.setdefault(key, set()).add(stack[-1])
        return t

    meter = _StepPeak(_cuda_device(model), enabled=peak)
    try:
        with _grads_set_aside(model), meter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                output = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
                loss = loss_fn(output)
            forward_peak = meter.cuda_peak_so_far()
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    per_layer: dict[str, int] = {}
    for key, names in owners.items():
        for name in names:
            per_layer[name] = per_layer.get(name, 0) + sizes[key]
    if layers is None:
        layers = [n for n, m in model.named_modules() if isinstance(m, CompressedLayer)]
    selected = set(layers)
    return {
        "total": sum(sizes.values()),
        "per_layer": per_layer,
        "selected": sum(sizes[k] for k, names in owners.items() if names & selected),
        "cuda_peak": forward_peak,
        "peak_bytes": meter.peak_bytes,
        "buffers": sum(n for (_, _, ptr), n in sizes.items() if ptr in buffer_storages),
    }


def measure_peak_step_memory(model: nn.Module, inputs: Any,
                             loss_fn: Callable[[Any], Tensor]) -> dict[str, Any]:
    """Peak bytes of one training step (forward, ``loss_fn``, backward) above its start.

    inputs: what ``model`` takes (a tensor, or a tuple of positional arguments);
    loss_fn(output) -> scalar. Returns ``{"peak_bytes": int or None, "device": "cpu" / "cuda:i",
    "source": "profiler" / "cuda_allocator"}``. What the peak includes: see the module
    docstring; the parameters' ``.grad`` are set aside for the step (so the figure includes
    allocating them) and put back afterwards. None when another profiler session is active.
    """
    cuda = _cuda_device(model)
    meter = _StepPeak(cuda)
    with _grads_set_aside(model), meter:
        output = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        loss_fn(output).backward()
    return {"peak_bytes": meter.peak_bytes, "device": str(cuda or torch.device("cpu")),
            "source": "cuda_allocator" if cuda is not None else "profiler"}


def profiler_peak_bytes(prof: torch.profiler.profile, device_type: str = "cpu") -> int:
    """Peak of the live bytes seen by a finished ``torch.profiler.profile(profile_memory=True)``.

    The profiler's ``[memory]`` events carry +bytes per allocation and -bytes per free; summed in
    time order (ties keep the recorded order) they give the bytes live above the start of the
    profile, and the maximum of that sum (0 if it never rises) is returned. Only events of
    ``device_type`` ("cpu" or "cuda") count. The profiler reports no free of a block allocated
    before the profile started (it warns "Memory block of unknown size was allocated before the
    profiling started"), so tensors older than the step never lower the sum.
    """
    wanted = getattr(torch.autograd.DeviceType, device_type.upper())
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == wanted]
    events.sort(key=lambda ev: ev[0])
    live = best = 0
    for _, nbytes in events:
        live += nbytes
        best = max(best, live)
    return best


def _cuda_device(model: nn.Module) -> Optional[torch.device]:
    """The first CUDA device among the parameters (None: the step is measured on the CPU)."""
    return next((p.device for p in model.parameters() if p.device.type == "cuda"), None)


@contextlib.contextmanager
def _grads_set_aside(model: nn.Module) -> Iterator[None]:
    """Every parameter's ``.grad`` is None inside the block and put back (as it was) after it."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


class _StepPeak:
    """Context manager measuring the peak bytes allocated inside it, above its start.

    CUDA (``device`` given): allocator statistics, reset on entry (this resets the device's
    global peak statistics); CPU: a memory-profiling ``torch.profiler`` session. ``peak_bytes``
    is set on exit; it stays None when disabled or when a profiler session is already running
    (starting another would cancel it).
    """

    def __init__(self, device: Optional[torch.device], enabled: bool = True) -> None:
        self.device, self.enabled = device, enabled
        self.peak_bytes: Optional[int] = None
        self._prof: Optional[torch.profiler.profile] = None
        self._start = 0

    def __enter__(self) -> "_StepPeak":
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.enabled:
            if torch.autograd._profiler_enabled():
                warnings.warn("a profiler session is already running: peak step memory not measured",
                              RuntimeWarning, stacklevel=3)
            else:
                # one session per measured step: without this, libkineto prints two "USDT
                # profiler_start/stop" lines and a CUDA-probe "ERROR" line for each on stderr
                # (a user's own KINETO_LOG_LEVEL wins)
                os.environ.setdefault("KINETO_LOG_LEVEL", "6")
                self._prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                self._prof.__enter__()
        return self

    def cuda_peak_so_far(self) -> Optional[int]:
        """CUDA: peak bytes above the start up to now (None on CPU)."""
        if self.device is None:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self._start

    def __exit__(self, *exc: Any) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(*exc)
            if exc[0] is None:
                self.peak_bytes = profiler_peak_bytes(prof, "cpu")
        elif self.device is not None and self.enabled and exc[0] is None:
            self.peak_bytes = self.cuda_peak_so_far()


def layer_flops(layer: nn.Module, input_shape: Optional[Sequence[int]] = None) -> dict[str, int]:
    """Analytic FLOPs (2 x multiply-adds) of one training step of a Linear/Conv2d layer.

    Keys: forward, backward_input, backward_weight, compression (projection and per-step
    decompositions), total, and vanilla_total for the same layer with plain autograd.
    ``input_shape``: the layer's input (B, ...) (default: the last input the layer ran on). Ranks
    are the layer's current ones (the last step's for hosvd/asi); what the method costs comes from
    its method object (:meth:`lance_cl.Compressor.step_macs`). Stride, dilation and groups enter
    through the output size and the per-group fan-in.
    """
    if input_shape is not None:
        shape = None
    else:
        shape = getattr(layer, "last_input_shape", None)     # already prepared (pre-padded)
        if not shape:
            raise ValueError("layer_flops needs input_shape= (or a layer that has run a forward pass)")
    try:
        layer_type = layer if isinstance(layer, CompressedLayer) else compressed_type_for(layer)
    except TypeError:
        raise TypeError(f"layer_flops supports Linear and Conv2d, got {type(layer).__name__}") from None
    if shape is None:
        shape = layer_type.prepared_shape(layer, tuple(input_shape))
    dense = layer_type.dense_macs(layer, shape)
    if isinstance(layer, CompressedLayer):
        grad_w, compression = layer.compressor.step_macs(layer, shape)
    else:
        grad_w, compression = dense, 0
    out = {"forward": 2 * dense, "backward_input": 2 * dense, "backward_weight": 2 * grad_w,
           "compression": 2 * compression}
    out["total"] = sum(out.values())
    out["vanilla_total"] = 2 * 3 * dense
    return out


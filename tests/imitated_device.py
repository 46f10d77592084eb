"""An accelerator imitated on the CPU, so that the suite sees the mistakes only a GPU would show.

A CPU-only torch cannot make a CUDA tensor, and a suite that only ever sees CPU tensors cannot see
a `.numpy()` on a device tensor or an op that mixes host and device tensors. This module registers
torch's spare backend (PrivateUse1) as the device "imitated": its tensors hold CPU tensors inside
and compute on them, but behave at the host boundary as CUDA's do:

- `.numpy()` on them raises, as on CUDA;
- an op mixing them with host tensors raises, except where CUDA allows it (0-dim host tensors,
  host index tensors, copies);
- every device-to-host transfer (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, ...) is recorded in
  `TRANSFERS`, so a test can count the host syncs of a training step.

Use it inside `with DeviceFactories():`. `imitate_cuda(monkeypatch, train_gpt)` then makes the harness treat that device as its CUDA device: the
branches it takes on CUDA (pinned copies, fused Adam, synchronize, memory and RNG queries) run."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves, tree_map

NAME = "imitated"
TRANSFERS: list[str] = []
_registered = False

# Ops that CUDA runs with a device `self` and host index tensors (it moves the indices itself).
HOST_INDEX_OK = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
                 torch.ops.aten._index_put_impl_.default}


def device(index: int = 0) -> torch.device:
    register()
    return torch.device(NAME, index)


class OnDevice(torch.Tensor):
    """A tensor on the imitated device: a CPU tensor inside, the device's name outside."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                   device=torch.device(NAME, 0), requires_grad=inner.requires_grad,
                                                   storage_offset=inner.storage_offset())

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self):
        return f"OnDevice({self.inner!r})"

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {NAME}:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        f"to host memory first.")

    def tolist(self):
        TRANSFERS.append("tolist")
        return self.inner.tolist()

    def __reduce_ex__(self, protocol):
        # torch.save of a CUDA tensor loads back with map_location="cpu"; so does this one.
        return self.inner.__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        return OnDevice(self.inner.clone())

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            target = torch.device(kwargs.get("device") or args[0].device)
            out = func(unwrap(args[0]), **{**kwargs, "device": torch.device("cpu")})
            if target.type == "cpu":
                TRANSFERS.append("to_host")
                return out
            return OnDevice(out)
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(src, OnDevice) and not isinstance(dst, OnDevice):
                TRANSFERS.append("copy_to_host")
            unwrap(dst).copy_(unwrap(src), *args[2:], **kwargs)
            return dst
        if func is torch.ops.aten._local_scalar_dense.default:
            TRANSFERS.append("item")
            return func(unwrap(args[0]))
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func in HOST_INDEX_OK and isinstance(args[0], OnDevice):
            tensors = [args[0]] + [a for a in tree_leaves((args[2:], kwargs)) if isinstance(a, torch.Tensor)]
        host = [a for a in tensors if not isinstance(a, OnDevice) and a.dim() > 0]
        if host:
            raise RuntimeError(f"{func}: Expected all tensors to be on the same device, but found at least two "
                               f"devices, {NAME}:0 and cpu!")
        kwargs = {k: torch.device("cpu") if k == "device" and v is not None else v for k, v in kwargs.items()}
        return tree_map(wrap, func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs)))


def unwrap(t):
    return t.inner if isinstance(t, OnDevice) else t


def wrap(t):
    return OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t


def _factory(keyset, op, *args, **kwargs):
    """Ops that reach the device with no tensor of it as input: factories (zeros, arange, empty, ...)."""
    if any(isinstance(a, torch.Tensor) for a in tree_leaves((args, kwargs))):
        raise NotImplementedError(f"imitated device: {op} with tensor inputs reached the backend")
    kwargs = {k: torch.device("cpu") if k == "device" and v is not None else v for k, v in kwargs.items()}
    return tree_map(wrap, op(*args, **kwargs))


class DeviceFactories(torch.overrides.TorchFunctionMode):
    """Factories asked for the device (torch.arange(n, device=...), torch.tensor(..., device=...)) are
    made on the host and moved there whole: torch builds some of them from an empty tensor that it
    then resizes, which a wrapped tensor cannot follow."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = kwargs.get("device")
        if target is not None and torch.device(target).type == NAME:
            return wrap(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


def register():
    global _registered, _library
    if _registered:
        return
    from torch.utils.backend_registration import _DummyBackendModule, _setup_privateuseone_for_python_backend

    class Backend(_DummyBackendModule):
        def get_amp_supported_dtype(self):  # torch.autocast(device_type) asks the backend
            return [torch.float16, torch.bfloat16]

    _setup_privateuseone_for_python_backend(NAME, backend_module=Backend())
    _library = torch.library.Library("_", "IMPL")
    _library.fallback(_factory, dispatch_key="PrivateUse1", with_keyset=True)
    _registered = True


def imitate_cuda(monkeypatch, train_gpt) -> torch.device:
    """The harness's CUDA branches, run against the imitated device; returns that device."""
    dev = device()
    monkeypatch.setattr(train_gpt.Runtime, "is_cuda", property(lambda self: self.device.type == NAME))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # Pinning needs a real accelerator; what matters here is that the pinned copy is a host tensor.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    TRANSFERS.clear()
    return dev

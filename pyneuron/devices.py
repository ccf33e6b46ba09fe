"""Torch devices and dtypes named by users (``"cuda:1"``, ``"bfloat16"``), checked
before any model is loaded or moved."""

from __future__ import annotations

from typing import Any

from .errors import PyneuronError

#: Precisions a model may run in, by name.
DTYPES = ("float32", "float16", "bfloat16")


def available_devices() -> list[str]:
    """The devices torch can use on this machine, e.g. ``['cpu', 'cuda:0', 'cuda:1']``."""
    import torch

    found = ["cpu"]
    found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def torch_device(device: Any) -> Any:
    """``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``)
    as a ``torch.device`` that exists on this machine.

    Raises
    ------
    PyneuronError
        For a name torch does not know or a device this machine does not have; the
        message lists the devices it has.

    Examples
    --------
    >>> torch_device("cpu")
    device(type='cpu')
    """
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise PyneuronError(
            f"unknown device {device!r}; use cpu, cuda, cuda:N or mps (this machine has: "
            f"{', '.join(available_devices())})"
        ) from None
    have = available_devices()
    if resolved.type == "cuda":
        usable = f"cuda:{resolved.index or 0}" in have
    else:
        usable = resolved.type in ("cpu", "mps") and resolved.type in have
    if not usable:
        raise PyneuronError(
            f"device {device!r} is not available on this machine (it has: {', '.join(have)})"
        )
    return resolved


def torch_dtype(dtype: Any) -> Any:
    """``dtype`` (``"float32"``, ``"float16"``, ``"bfloat16"`` or a torch floating dtype)
    as a torch dtype.

    Examples
    --------
    >>> torch_dtype("bfloat16")
    torch.bfloat16
    """
    import torch

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise PyneuronError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise PyneuronError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)

"""Torch devices and dtypes named by users (``"cuda:1"``, ``"bfloat16"``), checked
before any model is loaded or moved."""

from __future__ import annotations

from typing import Any

from .errors import PyneuronError

#: The kinds of device a model may run on.
DEVICE_TYPES = ("cpu", "cuda", "mps")
#: Precisions a model may run in, by the names users give them.
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}  # fmt: skip


def available_devices() -> list[str]:
    """The devices models can run on here: ``cpu``, each ``cuda:N``, ``mps``."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def _unavailable(device: Any) -> str | None:
    """Why ``device`` (a ``torch.device`` of a known type) is not usable here, or None."""
    import torch

    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return f"this torch ({torch.__version__}) is built without CUDA"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "torch sees no CUDA GPU"
        if device.index is not None and device.index >= count:
            return f"torch sees {count} CUDA GPU(s), numbered from 0"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS (Apple GPU) is not available"
    return None


def resolve_device(device: Any = None) -> Any:
    """The ``torch.device`` to run on, checked to exist here.

    Parameters
    ----------
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``; ``None``
        picks CUDA when available, else the CPU.

    Returns
    -------
    torch.device

    Raises
    ------
    PyneuronError
        An unknown device, or one this machine does not have, naming the devices it has.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = ", ".join(available_devices())
    try:
        parsed = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise PyneuronError(
            f"unknown device {device!r}: give cpu, cuda, cuda:N or mps (available here: {here})"
        )
    reason = _unavailable(parsed)
    if reason is not None:
        raise PyneuronError(
            f"device {str(parsed)!r} is not available: {reason} (available here: {here})"
        )
    return parsed


def resolve_dtype(dtype: Any, device: Any) -> Any:
    """The ``torch.dtype`` to run the models in on ``device`` (a ``torch.device``).

    Parameters
    ----------
    dtype
        ``"float32"``, ``"float16"``, ``"bfloat16"`` (or ``fp32``, ``fp16``, ``half``,
        ``bf16``) or one of those ``torch`` dtypes; ``None``: float16 on CUDA, float32
        elsewhere. float16 is allowed on the CPU too (recent torch runs these models in it),
        but it is emulated there and slow: bfloat16 is the CPU's reduced precision.

    Returns
    -------
    torch.dtype

    Raises
    ------
    PyneuronError
        Any other dtype.
    """
    import torch

    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        name: str | None = str(dtype).removeprefix("torch.")
    else:
        name = dtype.strip().lower() if isinstance(dtype, str) else None
    if name not in DTYPES:
        raise PyneuronError(
            f"unsupported dtype {dtype!r}: give float32, float16 or bfloat16 (or the torch dtype)"
        )
    return getattr(torch, DTYPES[name])


def resolve_placement(device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(resolve_device(device), resolve_dtype(dtype, that device))``: checked before any
    model loads, so that a device this machine lacks fails fast.

    Examples
    --------
    >>> resolve_placement("cpu", "bf16")
    (device(type='cpu'), torch.bfloat16)
    """
    parsed = resolve_device(device)
    return parsed, resolve_dtype(dtype, parsed)

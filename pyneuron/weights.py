"""A fingerprint of a torch module's weights (for caches and resumable captures)."""

from __future__ import annotations

import hashlib
from typing import Any


def weights_hash(model: Any) -> str:
    """BLAKE2 of every parameter and buffer of ``model`` (names, dtypes, shapes, bytes).

    Examples
    --------
    >>> import torch
    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> weights_hash(a) == weights_hash(a), weights_hash(a) == weights_hash(b)
    (True, False)
    """
    import torch

    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

"""Image files of a probing set: which files are images, in what order, their pixels and
their content keys (shared by capture, concept sources and describers)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .errors import PyneuronError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files in a folder (recursively), sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise PyneuronError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PyneuronError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    return files


def image_file_key(path: str | os.PathLike[str]) -> str:
    """Content key of an image file: the BLAKE2b-160 hex digest of its bytes (stores
    built by :func:`pyneuron.concepts.segment` record one per image)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(b"file")
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError as error:
        raise PyneuronError(f"cannot read image {path}: {error}") from None
    return digest.hexdigest()


def open_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise PyneuronError(f"cannot decode image {path}: {error}") from None

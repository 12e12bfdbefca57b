"""JPEG test data shared by the decode benchmarks (transform_bench.py, gpu_bench.py): photo-like
images of ImageNet-like sizes made with Pillow, and tar members read by offset with pread, as a
map-style dataset would."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np


def photo_jpeg(rng: np.random.Generator) -> bytes:
    """A 300-600 px JPEG: smooth colour fields plus fine texture (~40-90 KB, like a photo)."""
    from PIL import Image

    h, w = (int(v) for v in rng.integers(300, 601, 2))
    coarse = Image.fromarray((rng.random((h // 24 + 2, w // 24 + 2, 3)) * 255)
                             .astype(np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(coarse).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    b = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(b, format="JPEG", quality=90)
    return b.getvalue()


def tar_members(root: Path, suffix: str = ".jpg") -> list[tuple[str, int, int]]:
    """(tar file, data offset, size) of every member ending in `suffix`, tars in name order."""
    items = []
    for tar in sorted(root.glob("*.tar")):
        with tarfile.open(tar) as t:
            items += [(str(tar), m.offset_data, m.size) for m in t.getmembers()
                      if m.name.endswith(suffix)]
    return items


def read_member(item: tuple[str, int, int]) -> bytes:
    path, offset, size = item
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)

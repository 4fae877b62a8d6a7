"""Datasets and how their training samples are shared out over the nodes."""

from snake_mpi.data.partition import label_histogram, partition_dirichlet, partition_iid
from snake_mpi.data.synthetic import DEFAULT_NOISE, Dataset, make_synthetic

__all__ = [
    "DEFAULT_NOISE",
    "Dataset",
    "label_histogram",
    "make_synthetic",
    "partition_dirichlet",
    "partition_iid",
]

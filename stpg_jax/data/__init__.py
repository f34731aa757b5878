"""Datasets, splits and the input pipeline.

build_data(config.data, workdir) → DataBundle(info, labeled, unlabeled, val); make_train_loader(bundle, ...) →
an iterator of augmented numpy batches with get_state()/set_state(). See docs/data.md.
"""

from stpg_jax.data.core import DATASETS, DataBundle, DatasetInfo, build_data
from stpg_jax.data.errors import DataError
from stpg_jax.data.pipeline import TrainLoader, make_train_loader

__all__ = ['DATASETS', 'DataBundle', 'DataError', 'DatasetInfo', 'TrainLoader', 'build_data', 'make_train_loader']

"""Random-access sources over prepared data: src[i] → {'image': (H, W, 3) uint8, 'label': (H, W) uint8, 'id'}."""

import logging

import numpy as np


class PreparedSource:
    """Items `indices` of a tfds array_record split, in the given order.

    Unlabelled views (with_label=False) return no 'label'. The tfds data source is opened lazily so that the
    object pickles cheaply into grain worker processes.
    """

    def __init__(self, builder_dir, split, indices, ids, with_label=True, name=''):
        self.builder_dir, self.split = str(builder_dir), split
        self.indices = np.asarray(indices, np.int64)
        self.ids = list(ids)
        self.with_label, self.name = with_label, name
        self._source = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_source'] = None
        return state

    def _data_source(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            # PIL decodes the PNG/JPEG bytes; tfds would otherwise advise OpenCV once in every worker process.
            logging.getLogger('absl').addFilter(lambda record: 'OpenCV is not installed' not in record.getMessage())

            builder = tfds.builder_from_directory(self.builder_dir)
            self._source = builder.as_data_source(split=self.split)
        return self._source

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        record = self._data_source()[int(self.indices[int(i)])]
        item = {'image': np.asarray(record['image'], np.uint8), 'id': self.ids[int(i)]}
        if self.with_label:
            item['label'] = np.asarray(record['label'], np.uint8)[..., 0]
        return item

    def __repr__(self):
        kind = 'labelled' if self.with_label else 'unlabelled'
        return f'PreparedSource({self.name}/{self.split}, {len(self)} {kind})'


class ConcatSource:
    """Sources one after another (e.g. a folder dataset's unused labelled images + its unlabelled ones)."""

    def __init__(self, sources):
        self.sources = [s for s in sources if len(s)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side='right')) - 1
        return self.sources[k][i - self.offsets[k]]

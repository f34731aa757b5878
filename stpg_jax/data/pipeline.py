"""The training input pipeline (grain): labelled batches plus two independent unlabelled streams.

Each stream walks its source in a seeded order that is reshuffled on every pass (grain's index shuffle with
seed + pass). Position j of a stream always holds the same item with the same augmentation, whatever the
worker count: the augmentation generator is seeded by (seed, stream, j). Batch k of process p takes the
global positions k·B + p·B/P … k·B + (p+1)·B/P − 1, so processes see disjoint shards of the global batch.
The loader's state is grain's iterator state (the next batch index), JSON-serialisable.
"""

import json
import sys

import grain
import numpy as np

from stpg_jax.data.augment import weak_augment
from stpg_jax.data.core import config_field as _get
from stpg_jax.data.errors import DataError

_STREAMS = ('labeled', 'unlabeled0', 'unlabeled1')


class _Stream:
    """A source in endless reshuffled order, augmented deterministically per position."""

    def __init__(self, source, seed, stream_index, crop_size, scales, with_label, variant="release"):
        self.order = grain.MapDataset.source(source).shuffle(seed=(seed * 7919 + stream_index) % 2**32).repeat(None)
        self.seed, self.stream_index = seed, stream_index
        self.crop_size, self.scales, self.with_label = crop_size, tuple(scales), with_label
        self.variant = variant

    def __getitem__(self, position):
        item = self.order[position]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.stream_index, position]))
        label = item['label'] if self.with_label else None
        return weak_augment(rng, item['image'], label, self.crop_size, self.scales, variant=self.variant)


class _MakeBatch(grain.transforms.Map):
    """Batch index k → the dict of numpy arrays of this process's share of global batch k."""

    def __init__(self, streams, global_batches, local_batches, process_index):
        self.streams, self.global_batches, self.local_batches = streams, global_batches, local_batches
        self.process_index = process_index

    def map(self, k):
        batch = {}
        for name, stream in self.streams.items():
            g, b = self.global_batches[name], self.local_batches[name]
            start = k * g + self.process_index * b
            views = [stream[start + i] for i in range(b)]
            key = 'image' if name == 'labeled' else name
            batch[key] = np.stack([v[0] for v in views])
            batch[f'{key}_box'] = np.stack([v[2] for v in views])
            if name == 'labeled':
                batch['label'] = np.stack([v[1] for v in views]).astype(np.int32)
        return batch


class TrainLoader:
    """Iterator of per-process batches with get_state()/set_state() for checkpoints."""

    def __init__(self, dataset, steps_per_epoch, local_batches):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self.steps_per_epoch = steps_per_epoch
        self.local_batches = local_batches

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            raise RuntimeError('the train loader is closed')
        return next(self._iterator)

    def get_state(self):
        state = self._iterator.get_state()
        return json.loads(json.dumps(state, default=_to_jsonable))

    def set_state(self, state):
        self._iterator.set_state(_from_jsonable(state))

    def close(self):
        # The iterator is dropped here, while the interpreter is whole: collected at exit instead, its __del__ would
        # close it again after grain's modules are torn down and print an ignored exception.
        iterator, self._iterator = self._iterator, None
        close = getattr(iterator, 'close', None)
        if close is not None:
            close()


def _to_jsonable(obj):
    if isinstance(obj, bytes):
        return {'__bytes__': obj.decode('latin-1')}
    if isinstance(obj, np.integer):
        return int(obj)
    raise TypeError(f'loader state holds a {type(obj).__name__}, not JSON-serialisable')


def _from_jsonable(obj):
    if isinstance(obj, dict):
        if set(obj) == {'__bytes__'}:
            return obj['__bytes__'].encode('latin-1')
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def make_train_loader(bundle, config, seed, process_index=0, process_count=1, with_unlabeled=True):
    """Batches: 'image' uint8 (Bl, S, S, 3), 'label' int32 (Bl, S, S) [+ 'unlabeled0', 'unlabeled1' uint8 (Bu, S, S, 3)],
    and each image's box in its crop, '<name>_box' int32 (B, 4) (the network zeroes the padding outside it).

    Bl = batch_labeled / process_count, Bu = batch_unlabeled / process_count (global sizes in the config).
    """
    crop = int(_get(config, 'crop_size', 512))
    scales = tuple(_get(config, 'scales', (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)))
    global_batches = {'labeled': int(_get(config, 'batch_labeled', 8))}
    if with_unlabeled:
        global_batches['unlabeled0'] = global_batches['unlabeled1'] = int(_get(config, 'batch_unlabeled', 8))
    local_batches = {}
    for name, g in global_batches.items():
        if g <= 0 or g % process_count:
            key = 'batch_labeled' if name == 'labeled' else 'batch_unlabeled'
            raise ValueError(
                f'data.{key} = {g} is not divisible by the process count {process_count}; '
                f'set a global batch size that is a multiple of {process_count}'
            )
        local_batches[name] = g // process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    if len(bundle.labeled) == 0:
        raise DataError('the labelled split is empty; expected at least one labelled image')
    if with_unlabeled and len(bundle.unlabeled) == 0:
        raise DataError(
            'the unlabelled split is empty (num_labeled takes the whole pool?); expected unlabelled '
            'images for semi-supervised training, or with_unlabeled=False'
        )
    seed = int(seed) % 2**31
    variant = str(_get(config, 'augmentation', 'legacy'))
    streams = {'labeled': _Stream(bundle.labeled, seed, 0, crop, scales, True, variant)}
    if with_unlabeled:
        streams['unlabeled0'] = _Stream(bundle.unlabeled, seed, 1, crop, scales, False, variant)
        streams['unlabeled1'] = _Stream(bundle.unlabeled, seed, 2, crop, scales, False, variant)

    workers = int(_get(config, 'workers', 0))
    prefetch = int(_get(config, 'prefetch', 2))
    ds = grain.MapDataset.range(sys.maxsize).map(_MakeBatch(streams, global_batches, local_batches, process_index))
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=max(prefetch, 1) if workers == 0 else 1, prefetch_buffer_size=max(prefetch, 1))
    )
    if workers > 0:
        from absl import flags  # grain's worker processes read absl flags; outside an absl app, use defaults

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
    steps = bundle.steps_per_epoch(
        global_batches['labeled'], global_batches.get('unlabeled0', global_batches['labeled'])
    )
    return TrainLoader(ds, steps, local_batches)

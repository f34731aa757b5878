"""tfds builders: a dataset's official layout (manual dir) → array_record files, read back without TensorFlow.

Features: image (encoded bytes as found on disk, or PNG when the file is not RGB), label (single-channel PNG
of class ids, 255 = ignore; 1x1 for unlabelled images), has_label, id. Examples are written in sorted-id order
(shuffling disabled) and the ids of each split are kept in the dataset's metadata, so index ↔ id needs no scan.
tfds writes into a temporary `*.incomplete*` directory and renames it when every split is done, so a failed
preparation never reads as a prepared dataset.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from stpg_jax.data.errors import DataError


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """These datasets exist only where they were prepared: there is no public copy of their metadata to fetch. (tfds'
    own lookup makes an empty temporary directory each time a builder opens an unprepared dataset, and keeps it.)"""

    def initialize_from_bucket(self):
        pass


class _SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder; subclasses only fix the name (tfds derives it from the class name)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Place the dataset in its official layout; see docs/data.md.'

    def __init__(self, *, layout, data_dir, **kwargs):
        self._layout = layout
        config = tfds.core.BuilderConfig(name=layout.config_name, description=f'{layout.name} from its manual dir')
        super().__init__(data_dir=data_dir, config=config, file_format='array_record', **kwargs)

    def _info(self):
        return _LocalDatasetInfo(
            builder=self,
            description=f'{self._layout.name} semantic segmentation ({self._layout.num_classes} classes).',
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=(None, None, 3)),
                    'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
                    'has_label': tfds.features.Scalar(dtype=np.bool_),
                    'id': tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        layout = self._layout
        layout.check()
        splits = layout.split_examples()
        for split, examples in splits.items():
            if not examples:  # tfds would fail later with a bare "No examples were yielded"
                raise DataError(f'the {split} split is empty, {layout.split_source(split)}, expected at least one '
                                'example')
        self.info.metadata['ids'] = {s: [e.id for e in examples] for s, examples in splits.items()}
        self.info.metadata['class_names'] = list(layout.class_names)
        self.info.metadata['palette'] = np.asarray(layout.palette).tolist()
        self.info.metadata['manual_dir'] = os.path.abspath(str(dl_manager.manual_dir))
        return {split: self._generate_examples(split, examples) for split, examples in splits.items()}

    def _generate_examples(self, split, examples):
        # Each example is read and validated here; a DataError aborts the whole preparation, and tfds removes
        # its temporary directory, so nothing half-written is left that reads as prepared.
        for i, e in enumerate(examples):
            yield f'{i:08d}', self._layout.read_example(e)


class StpgVoc(_SegmentationBuilder, skip_registration=True):
    pass


class StpgCityscapes(_SegmentationBuilder, skip_registration=True):
    pass


class StpgCamvid(_SegmentationBuilder, skip_registration=True):
    pass


class StpgFolder(_SegmentationBuilder, skip_registration=True):
    pass


_BUILDERS = {'voc': StpgVoc, 'cityscapes': StpgCityscapes, 'camvid': StpgCamvid, 'folder': StpgFolder}


def default_data_dir():
    """$TFDS_DATA_DIR, else ~/tensorflow_datasets (where tfds itself puts prepared data)."""
    return os.environ.get('TFDS_DATA_DIR') or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def get_builder(layout, data_dir=''):
    data_dir = data_dir or default_data_dir()
    return _BUILDERS[layout.name](layout=layout, data_dir=data_dir)


def prepare(layout, data_dir='', force=False):
    """Prepare (if needed) and return the builder; tfds shows a progress bar per split.

    Bad input raises DataError naming the file.
    """
    data_dir = data_dir or default_data_dir()
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f'data_dir {data_dir} cannot be created ({e}); expected a writable directory for prepared data')
    if not os.access(data_dir, os.W_OK):
        raise DataError(f'data_dir {data_dir} is not writable; expected a writable directory for prepared data')
    builder = get_builder(layout, data_dir)
    if builder.is_prepared() and not force:
        return builder
    layout.check()
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if force else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=layout.root, download_mode=mode)
    )
    return builder

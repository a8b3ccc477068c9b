"""`fashion_mnist_local`: Fashion-MNIST from local IDX files as a TFDS dataset (no download).

The files are those of Debian's `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`):
60,000 train + 10,000 test 28x28 grey images, 10 classes, in the files' order.
"""
import gzip
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from afd_jax.data.builders.png import classification_info, encode_pngs
from afd_jax.errors import UserError

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
         'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally gzipped) of unsigned bytes as an array of its shape."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  ndim = data[3]
  if data[:3] != b'\0\0\x08' or not 1 <= ndim <= 3:
    raise UserError(f'{path} is not an IDX file of unsigned bytes.')
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != np.prod(shape):
    raise UserError(f'{path} is truncated: expected {int(np.prod(shape))} values.')
  return array.reshape(shape)


def load_split(source_dir: str, split: str):
  """(uint8 images [N, 28, 28, 1], int labels [N]) of `split` ('train' or 'test')."""
  paths = [os.path.join(source_dir, name) for name in FILES[split]]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise UserError(f'fashion_mnist_local: {", ".join(missing)} not found. Install the files with '
                    '`apt-get install dataset-fashion-mnist` or set config.dataset.folder to the '
                    'folder holding the four IDX files.')
  images, labels = (read_idx(p) for p in paths)
  return images[..., None], labels.astype(np.int64)


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST read from local IDX files."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS derives this from the package through `importlib_resources`, which it fails to require on
  # Python >= 3.9 (tensorflow/datasets#11212).
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {'1.0.0': 'Fashion-MNIST from the IDX files of dataset-fashion-mnist.'}

  def __init__(self, *, source_dir: str = '', **kwargs):
    self._source_dir = source_dir or DEFAULT_DIR
    super().__init__(**kwargs)

  def _info(self):
    return classification_info(self, (28, 28, 1), 10, __doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(*load_split(self._source_dir, split))
            for split in FILES}

  def _generate_examples(self, images, labels):
    for i, (png, label) in enumerate(zip(encode_pngs(images), labels)):
      yield i, {'image': png, 'label': label}

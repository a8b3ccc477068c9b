"""`digits`: scikit-learn's bundled handwritten digits as a TFDS dataset (no download).

1,797 8x8 grey images, 10 classes. scikit-learn stores pixel values 0..16; they are stored here
as uint8 `round(v * 255 / 16)`. The split is fixed: `np.random.RandomState(0).permutation(1797)`,
its first 1,437 indices are `train`, the last 360 `test`.
"""
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from sklearn.datasets import load_digits

from afd_jax.data.builders.png import classification_info, encode_pngs

NUM_TRAIN = 1437
NUM_TEST = 360


def split_indices():
  """(train, test) indices into `sklearn.datasets.load_digits()`."""
  perm = np.random.RandomState(0).permutation(NUM_TRAIN + NUM_TEST)
  return perm[:NUM_TRAIN], perm[NUM_TRAIN:]


def load_images():
  """(uint8 images [1797, 8, 8, 1], int labels [1797]) in scikit-learn's order."""
  digits = load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS derives this from the package through `importlib_resources`, which it fails to require on
  # Python >= 3.9 (tensorflow/datasets#11212).
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {'1.0.0': 'Seeded 1,437 / 360 split of sklearn.datasets.load_digits.'}

  def _info(self):
    return classification_info(self, (8, 8, 1), 10, __doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    images, labels = load_images()
    train, test = split_indices()
    return {'train': self._generate_examples(images, labels, train),
            'test': self._generate_examples(images, labels, test)}

  def _generate_examples(self, images, labels, indices):
    for i, png in zip(indices, encode_pngs(images[indices])):
      yield int(i), {'image': png, 'label': labels[i]}

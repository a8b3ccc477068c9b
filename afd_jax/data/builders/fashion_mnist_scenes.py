"""`fashion_mnist_scenes`: an offline segmentation set of Fashion-MNIST garments on one canvas.

Each scene is a 48x48 grey canvas of faint uniform noise (0..40) on which one to three garments
of Fashion-MNIST (28x28) are placed at random positions, a later garment over an earlier one.
A garment's pixels brighter than 40 are drawn and labelled with its class + 1; every other pixel
is background (0). 11 classes: background, then Fashion-MNIST's ten. `train` (10,000 scenes)
draws its garments from Fashion-MNIST's train split, `test` (2,000) from its test split; the
scenes are a pure function of the source files and the split's seed.

The garments come from Debian's `dataset-fashion-mnist` (see `fashion_mnist_local`).
"""
from typing import Mapping, Tuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from afd_jax.data.builders.fashion_mnist_local import DEFAULT_DIR, load_split
from afd_jax.data.builders.png import encode_pngs

SIZE = 48
NUM_CLASSES = 11  # background + Fashion-MNIST's 10
GARMENTS_PER_SCENE = (1, 3)
NOISE = 40  # background noise is 0..NOISE; a garment's pixels above it are drawn
SCENES = {'train': 10_000, 'test': 2_000}
SEEDS = {'train': 4_801, 'test': 4_802}


def compose_scenes(garments: np.ndarray, classes: np.ndarray, count: int, seed: int,
                   size: int = SIZE) -> Tuple[np.ndarray, np.ndarray]:
  """(uint8 images [count, size, size, 1], uint8 masks [count, size, size, 1]) of `count` scenes
  from `garments` (uint8 [N, h, w] or [N, h, w, 1]) of classes `classes` (ints [N])."""
  garments = garments.reshape(garments.shape[:3])
  h, w = garments.shape[1:]
  rng = np.random.default_rng(seed)
  images = rng.integers(0, NOISE + 1, (count, size, size), dtype=np.uint8)
  masks = np.zeros((count, size, size), np.uint8)
  for i in range(count):
    for g in rng.integers(0, len(garments), rng.integers(GARMENTS_PER_SCENE[0],
                                                        GARMENTS_PER_SCENE[1] + 1)):
      top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
      drawn = garments[g] > NOISE
      image, mask = images[i, top:top + h, left:left + w], masks[i, top:top + h, left:left + w]
      image[drawn] = garments[g][drawn]
      mask[drawn] = int(classes[g]) + 1
  return images[..., None], masks[..., None]


class FashionMnistScenes(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST garments on a 48x48 canvas, labelled per pixel."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS derives this from the package through `importlib_resources`, which it fails to require on
  # Python >= 3.9 (tensorflow/datasets#11212).
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {'1.0.0': '10,000 / 2,000 seeded scenes of 1-3 garments on a 48x48 canvas.'}

  def __init__(self, *, source_dir: str = '', scenes: Mapping[str, int] = None, **kwargs):
    self._source_dir = source_dir or DEFAULT_DIR
    self._scenes = dict(scenes or SCENES)
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(SIZE, SIZE, 1)),
            'segmentation_mask': tfds.features.Image(shape=(SIZE, SIZE, 1))}),
        metadata=tfds.core.MetadataDict(num_classes=NUM_CLASSES),
        disable_shuffling=True)  # scene i is example i of its split

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in self._scenes}

  def _generate_examples(self, split):
    garments, classes = load_split(self._source_dir, split)
    images, masks = compose_scenes(garments, classes, self._scenes[split], SEEDS[split])
    for i, (image, mask) in enumerate(zip(encode_pngs(images), encode_pngs(masks))):
      yield i, {'image': image, 'segmentation_mask': mask}

"""Shared by our builders: PNG-encoding many small images at once (TFDS would encode them one by
one, a lot slower) and the DatasetInfo of an image-classification dataset."""
from typing import List, Tuple

import numpy as np
import tensorflow_datasets as tfds

from afd_jax.data.tfimport import tf


def classification_info(builder, image_shape: Tuple[int, int, int], num_classes: int,
                        description: str) -> 'tfds.core.DatasetInfo':
  """{'image': uint8 image_shape, 'label': one of num_classes}, supervised."""
  return tfds.core.DatasetInfo(
      builder=builder, description=description,
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=image_shape),
          'label': tfds.features.ClassLabel(num_classes=num_classes)}),
      supervised_keys=('image', 'label'))


def encode_pngs(images: np.ndarray) -> List[bytes]:
  """uint8 [N, H, W, C] -> N PNG files' bytes, in order."""
  ds = tf.data.Dataset.from_tensor_slices(images).map(
      tf.image.encode_png, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
  return [png for batch in ds.as_numpy_iterator() for png in batch.tolist()]

"""PNG-encodes many small images at once (TFDS would encode them one by one, a lot slower)."""
from typing import List

import numpy as np

from afd_jax.data.tfimport import tf


def encode_pngs(images: np.ndarray) -> List[bytes]:
  """uint8 [N, H, W, C] -> N PNG files' bytes, in order."""
  ds = tf.data.Dataset.from_tensor_slices(images).map(
      tf.image.encode_png, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
  return [png for batch in ds.as_numpy_iterator() for png in batch.tolist()]

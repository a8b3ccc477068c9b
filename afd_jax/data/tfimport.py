"""TensorFlow for the input pipeline only: imported lazily, quietly, never given an accelerator."""
import logging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # no C++ INFO banners

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  tf.config.set_visible_devices([], 'GPU')  # JAX owns the accelerators.
except RuntimeError:  # TensorFlow was initialised before us; nothing to hide any more.
  pass


class _DropTfdsDeprecation(logging.Filter):
  """TFDS 4.9.10 reads its own deprecated `FeatureConnector.dtype` and warns about it."""

  def filter(self, record):
    return 'FeatureConnector.dtype' not in record.getMessage()


logging.getLogger('absl').addFilter(_DropTfdsDeprecation())

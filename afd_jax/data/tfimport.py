"""TensorFlow for the input pipeline only: imported lazily, and never given an accelerator."""
import tensorflow as tf

try:
  tf.config.set_visible_devices([], 'GPU')  # JAX owns the accelerators.
except RuntimeError:  # TensorFlow was initialised before us; nothing to hide any more.
  pass

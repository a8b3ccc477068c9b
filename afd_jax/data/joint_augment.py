"""Augmentation of an image and its label mask together, as TF ops from stateless keys.

- train: scale both so that the shorter side is `crop`, times s ~ U[min_scale, max_scale] (the
  image bilinearly, the mask by nearest neighbour, so labels stay labels), pad to at least
  `crop` (image 0, mask IGNORE_INDEX), take the same random `crop` x `crop` window of both,
  mirror both left-right with probability 1/2.
- eval: scale both so that the shorter side is `crop` (the training scale at s = 1), then take
  the central `crop` x `crop` window. A pair whose shorter side is `crop` already is not
  resized (the offline scenes).
The ignore index survives every step: nearest-neighbour resizing never mixes labels, padding
adds ignored pixels.

Written with tf.image's ops rather than Keras 3's preprocessing layers (which take segmentation
masks): those draw from a SeedGenerator's state, and here a batch must be a pure function of
(seed, shard, epoch, position) so that a restart is exact.
"""
from typing import Tuple

from afd_jax.data.tfimport import tf
from afd_jax.pixels import IGNORE_INDEX


def _resize_pair(image, mask, height, width):
  size = tf.stack([height, width])
  resized = tf.image.resize(image, size, 'bilinear', antialias=True)
  image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  mask = tf.image.resize(mask[..., None], size, 'nearest')[..., 0]
  return image, tf.cast(mask, tf.uint8)


def train_pair(image, mask, key, crop: int, scale: Tuple[float, float] = (0.5, 2.0),
               flip: bool = True):
  """uint8 image [H, W, C] and mask [H, W] -> the augmented `crop` x `crop` pair (see above)."""
  u = tf.random.stateless_uniform([4], key)
  shape = tf.cast(tf.shape(mask), tf.float32)
  s = (scale[0] + (scale[1] - scale[0]) * u[0]) * (crop / tf.reduce_min(shape))  # x 1: crop-sized
  new = tf.maximum(tf.cast(tf.round(shape * s), tf.int32), 1)
  image, mask = _resize_pair(image, mask, new[0], new[1])
  pad_h, pad_w = tf.maximum(crop - new[0], 0), tf.maximum(crop - new[1], 0)
  image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
  mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_INDEX)
  height, width = new[0] + pad_h, new[1] + pad_w
  top = tf.cast(tf.floor(u[1] * tf.cast(height - crop + 1, tf.float32)), tf.int32)
  left = tf.cast(tf.floor(u[2] * tf.cast(width - crop + 1, tf.float32)), tf.int32)
  image = image[top:top + crop, left:left + crop]
  mask = mask[top:top + crop, left:left + crop]
  if flip:
    mirror = u[3] < 0.5
    image = tf.where(mirror, image[:, ::-1], image)
    mask = tf.where(mirror, mask[:, ::-1], mask)
  return image, mask


def eval_pair(image, mask, crop: int):
  """The shorter side scaled to `crop` (not resized where it is already), the central
  `crop` x `crop` window of both."""
  shape = tf.shape(mask)
  short = tf.reduce_min(shape)
  new = tf.cast(tf.round(tf.cast(shape, tf.float32) * crop / tf.cast(short, tf.float32)),
                tf.int32)
  new = tf.maximum(new, crop)
  image, mask = tf.cond(tf.equal(short, crop), lambda: (image, mask),
                        lambda: _resize_pair(image, mask, new[0], new[1]))
  shape = tf.shape(mask)
  top, left = (shape[0] - crop) // 2, (shape[1] - crop) // 2
  return image[top:top + crop, left:left + crop], mask[top:top + crop, left:left + crop]


def checked_pair(image, mask, num_classes: int, name):
  """The pair, asserted to agree in size and to hold only labels below `num_classes` or
  IGNORE_INDEX; a failure's message names `name` (the mask's file or the example)."""
  image_hw, mask_hw = tf.shape(image)[:2], tf.shape(mask)
  same = tf.reduce_all(tf.equal(image_hw, mask_hw))
  tf.debugging.Assert(same, [tf.strings.join([name, tf.strings.format(
      ': the mask is {} (H, W), its image {}', (mask_hw, image_hw))])])
  labels = tf.cast(mask, tf.int32)
  bad = tf.logical_and(labels >= num_classes, labels != IGNORE_INDEX)
  tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [tf.strings.join([name, tf.strings.format(
      ': label {} is not below the {} classes nor the ignore index {}',
      (tf.reduce_max(tf.where(bad, labels, 0)), num_classes, IGNORE_INDEX))])])
  return image, mask

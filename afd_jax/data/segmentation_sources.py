"""Where segmentation examples come from: our offline `fashion_mnist_scenes`, TFDS's
`oxford_iiit_pet` (where prepared) and folders of images with PNG masks.

A source hands out the records of a split, or of one share of it, in a fixed order:
{'image': encoded bytes or a path, 'mask': encoded bytes or a path, 'name': what an error names};
`decode` turns a record into (uint8 image [H, W, C], uint8 mask [H, W]), checked (sizes agree,
labels below the class count or the ignore index) with a failure naming the record. Shares
follow `tfds.even_splits`, as the classification sources' (`sources.share_bounds`).
"""
import os
import re
from typing import Dict, List, Optional, Tuple

import tensorflow_datasets as tfds

from afd_jax.data import DENSE_NAMES, joint_augment
from afd_jax.data.sources import IMAGE_EXTENSIONS, _limited, _not_prepared, share_bounds
from afd_jax.data.tfimport import tf
from afd_jax.errors import UserError
from afd_jax.pixels import IGNORE_INDEX

NAMES = DENSE_NAMES  # afd_jax/data/__init__.py, which imports no TensorFlow
# oxford_iiit_pet's trimaps: 1 pet, 2 background, 3 the border between them (left out); the
# class of each stored value, None where a value is not the dataset's (refused).
PET_LABELS = (None, 1, 0, IGNORE_INDEX)
PET_CLASSES = 2


def open_source(ds_config):
  """The source `config.dataset` names; UserError if it is unknown, unprepared or malformed."""
  name = ds_config.name
  if name == 'mask_folder':
    return MaskFolderSource(ds_config.folder, ds_config.get('num_classes', 0))
  if name == 'fashion_mnist_scenes':
    from afd_jax.data.builders.fashion_mnist_scenes import (  # pylint: disable=g-import-not-at-top
        NUM_CLASSES, FashionMnistScenes)
    builder = FashionMnistScenes(data_dir=ds_config.data_dir or None, source_dir=ds_config.folder)
    if not builder.is_prepared():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return TfdsMaskSource(builder, NUM_CLASSES)
  if name == 'oxford_iiit_pet':
    return TfdsMaskSource(tfds.builder(name, data_dir=ds_config.data_dir or None), PET_CLASSES,
                          PET_LABELS)
  raise UserError(f'Unknown segmentation dataset.name {name!r}; expected one of '
                  f'{", ".join(NAMES)}.')


class TfdsMaskSource:
  """A prepared TFDS dataset with `image` and `segmentation_mask` features; `labels` maps the
  stored mask values to classes (a value it maps to None, or beyond it, is refused)."""

  def __init__(self, builder, num_classes: int, labels: Optional[Tuple[int, ...]] = None):
    self.name, self._builder = builder.name, builder
    self.num_classes, self._labels = num_classes, labels
    self.channels = builder.info.features['image'].shape[-1]

  def size(self, split: str, limit: int = 0) -> int:
    return int(self._as_dataset(_limited(split, limit)).cardinality())

  def records(self, split: str, *, limit: int = 0, index: int = 0, count: int = 1):
    share = tfds.even_splits(_limited(split, limit), count)[index]
    first = share_bounds(self.size(split, limit), index, count)[0]
    return self._as_dataset(share).enumerate(first).map(lambda i, ex: {
        'image': ex['image'], 'mask': ex['segmentation_mask'],
        'name': tf.strings.join([f'{self.name} {split} example ', tf.strings.as_string(i)])})

  def decode(self, record):
    image = tf.io.decode_image(record['image'], channels=self.channels, expand_animations=False)
    mask = tf.io.decode_png(record['mask'], channels=1)[..., 0]
    if self._labels is not None:
      mask = self._mapped(mask, record['name'])
    return joint_augment.checked_pair(image, mask, self.num_classes, record['name'])

  def _mapped(self, mask, name):
    """The stored values as classes; a value the table does not know fails naming `name`."""
    known = [v is not None for v in self._labels] + [False] * (256 - len(self._labels))
    values = tf.cast(mask, tf.int32)
    good = tf.gather(tf.constant(known), values)
    tf.debugging.Assert(tf.reduce_all(good), [tf.strings.join([name, tf.strings.format(
        ': mask value {} is not one of ' + self.name + "'s", tf.reduce_max(
            tf.where(good, -1, values)))])])
    table = tf.constant([IGNORE_INDEX if v is None else v for v in self._labels]
                        + [IGNORE_INDEX] * (256 - len(self._labels)), tf.uint8)
    return tf.gather(table, values)

  def _as_dataset(self, split):
    try:
      return self._builder.as_dataset(split=split, shuffle_files=False, decoders={
          'image': tfds.decode.SkipDecoding(), 'segmentation_mask': tfds.decode.SkipDecoding()})
    except AssertionError:  # TFDS: "could not find data in <data_dir>"
      raise UserError(_not_prepared(self._builder)) from None
    except ValueError as e:  # an unknown split, a bad slice
      raise UserError(f'{self.name}: {e}') from None


class MaskFolderSource:
  """`root/<split>/images/<name>.<jpg|jpeg|png>` with `root/<split>/masks/<name>.png` (one
  class index per pixel, IGNORE_INDEX for void; the layout Cityscapes and VOC convert to), in
  sorted name order. `num_classes` (config.dataset.num_classes) must be given. An image without
  a mask, or a mask without an image, is refused when the folder is opened."""
  channels = 3

  def __init__(self, root: str, num_classes: int):
    if not root or not tf.io.gfile.isdir(root):
      raise UserError(f'mask_folder: config.dataset.folder={root!r} is not a directory.')
    if not isinstance(num_classes, int) or num_classes < 1:
      raise UserError('mask_folder: set config.dataset.num_classes to the number of classes '
                      f'(labels 0..num_classes - 1, {IGNORE_INDEX} ignored).')
    self.name, self._root, self.num_classes = f'mask_folder {root}', root, num_classes
    self._pairs: Dict[str, List[Tuple[str, str]]] = {}
    for split in sorted(tf.io.gfile.listdir(root)):
      split = split.rstrip('/')
      if tf.io.gfile.isdir(os.path.join(root, split, 'images')):
        self._pairs[split] = _pairs(os.path.join(root, split))

  def size(self, split: str, limit: int = 0) -> int:
    return len(self._split(split)[:limit or None])

  def records(self, split: str, *, limit: int = 0, index: int = 0, count: int = 1):
    pairs = self._split(split)[:limit or None]
    start, end = share_bounds(len(pairs), index, count)
    images, masks = zip(*pairs[start:end]) if end > start else ((), ())
    return tf.data.Dataset.from_tensor_slices({
        'image': tf.constant(images, tf.string), 'mask': tf.constant(masks, tf.string),
        'name': tf.constant(masks, tf.string)})

  def decode(self, record):
    image = tf.io.decode_image(tf.io.read_file(record['image']), channels=3,
                               expand_animations=False)
    mask = tf.io.decode_png(tf.io.read_file(record['mask']), channels=1)[..., 0]
    return joint_augment.checked_pair(image, mask, self.num_classes, record['name'])

  def _split(self, split: str):
    if split not in self._pairs:
      raise UserError(f'mask_folder: {self._root} has no {split}/images/ folder (found: '
                      f'{", ".join(sorted(self._pairs)) or "none"}).')
    if not self._pairs[split]:
      raise UserError(f'mask_folder: {self._root}/{split}/images has no images.')
    return self._pairs[split]


def _pairs(split_dir: str) -> List[Tuple[str, str]]:
  """(image, mask) paths of a split folder, by name; UserError naming an unmatched file."""
  images = {os.path.splitext(f)[0]: f for f in tf.io.gfile.listdir(os.path.join(split_dir,
                                                                                 'images'))
            if f.lower().endswith(IMAGE_EXTENSIONS)}
  masks_dir = os.path.join(split_dir, 'masks')
  masks = {os.path.splitext(f)[0]: f for f in (tf.io.gfile.listdir(masks_dir)
                                               if tf.io.gfile.isdir(masks_dir) else ())
           if f.lower().endswith('.png')}
  for stem in sorted(images):
    if stem not in masks:
      raise UserError(f'mask_folder: {os.path.join(split_dir, "images", images[stem])} has no '
                      f'mask {os.path.join(masks_dir, stem + ".png")}.')
  for stem in sorted(masks):
    if stem not in images:
      raise UserError(f'mask_folder: {os.path.join(masks_dir, masks[stem])} has no image in '
                      f'{os.path.join(split_dir, "images")}.')
  return [(os.path.join(split_dir, 'images', images[s]), os.path.join(masks_dir, masks[s]))
          for s in sorted(images)]


def undecodable_message(error) -> str:
  """The line a failed `checked_pair` assertion carries (the record's name and what is wrong),
  from a `tf.errors.InvalidArgumentError` raised in a tf.data pipeline or eagerly."""
  found = (re.search(r"Summarized data: b'(.*)'", error.message)
           or re.search(r'assertion failed: \[(.*)\]', error.message))
  return found.group(1) if found else error.message.splitlines()[0]

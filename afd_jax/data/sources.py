"""Where examples come from: TFDS datasets (our offline builders included) and image folders.

A source hands out the *records* of a split, or of one process's share of it, in a fixed order:
{'image': the encoded file's bytes or its path, 'label': int32}; `decode` turns a record's image
into uint8 [H, W, C]. Shares follow `tfds.even_splits`: disjoint, their union is the split, and
the first `n % count` shares hold one example more.
"""
import os
import random
from typing import Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from afd_jax.data.tfimport import tf
from afd_jax.errors import UserError

TFDS_NAMES = ('cifar10', 'cifar100', 'imagenet2012', 'caltech_birds2011', 'stanford_dogs')
OWN_NAMES = ('digits', 'fashion_mnist_local')
NAMES = TFDS_NAMES + OWN_NAMES + ('image_folder',)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # those of tfds.folder_dataset.ImageFolder
# Only the image (left encoded) and the label are read.
_ENCODED = tfds.decode.PartialDecoding({'image': True, 'label': True},
                                       decoders={'image': tfds.decode.SkipDecoding()})


def open_source(ds_config):
  """The source that `config.dataset` names; raises UserError if it is unknown or not prepared."""
  name = ds_config.name
  if name == 'image_folder':
    return FolderSource(ds_config.folder)
  if name in OWN_NAMES:
    return TfdsSource(_own_builder(ds_config))
  if name in TFDS_NAMES:
    return TfdsSource(tfds.builder(name, data_dir=ds_config.data_dir or None))
  raise UserError(f'Unknown dataset.name {name!r}; expected one of {", ".join(NAMES)}.')


def share_bounds(n: int, index: int, count: int) -> Tuple[int, int]:
  """[start, end) of share `index` of `count` of n examples, as `tfds.even_splits`."""
  per, extra = divmod(n, count)
  start = per * index + min(index, extra)
  return start, start + per + (index < extra)


class TfdsSource:
  """A prepared TFDS dataset with `image` and `label` features."""

  def __init__(self, builder):
    self.name = builder.name
    self._builder = builder
    features = builder.info.features
    self.num_classes = features['label'].num_classes
    shape = tuple(features['image'].shape)
    self.channels = shape[-1]
    self.image_shape: Optional[Tuple[int, int, int]] = None if None in shape else shape

  def size(self, split: str, limit: int = 0) -> int:
    return int(self._as_dataset(_limited(split, limit)).cardinality())

  def records(self, split: str, *, limit: int = 0, index: int = 0, count: int = 1,
              shuffle_seed: Optional[int] = None):
    """Share `index` of `count`; `shuffle_seed` reads the share's files in a seeded order."""
    share = tfds.even_splits(_limited(split, limit), count)[index]
    return self._as_dataset(share, shuffle_seed).map(
        lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32)})

  def decode(self, image):
    image = tf.io.decode_image(image, channels=self.channels, expand_animations=False)
    return tf.ensure_shape(image, self.image_shape or (None, None, self.channels))

  def _as_dataset(self, split, shuffle_seed=None):
    try:
      return self._builder.as_dataset(
          split=split, decoders=_ENCODED, shuffle_files=shuffle_seed is not None,
          read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))
    except AssertionError:  # TFDS: "could not find data in <data_dir>"
      raise UserError(_not_prepared(self._builder)) from None
    except ValueError as e:  # an unknown split, a bad slice
      raise UserError(f'{self.name}: {e}') from None


class FolderSource:
  """`root/<split>/<class>/<image>` read as `tfds.folder_dataset.ImageFolder` would: classes are
  the sorted class-folder names of all splits, images are decoded to RGB, and each split's order
  is its sorted (class, path) list shuffled with `random.Random(split)`. A missing `test` split
  falls back to `valid`.
  """
  channels = 3
  image_shape = None  # sizes may vary

  def __init__(self, root: str):
    if not root or not tf.io.gfile.isdir(root):
      raise UserError(f'image_folder: config.dataset.folder={root!r} is not a directory.')
    self.name = f'image_folder {root}'
    self._root = root
    splits = {s: os.path.join(root, s) for s in _subfolders(root)}
    classes = sorted({c for path in splits.values() for c in _subfolders(path)})
    if not classes:
      raise UserError(f'image_folder: {root} has no class folders; expected '
                      f'{root}/<split>/<class>/<image> with splits such as train/ and test/.')
    self.num_classes = len(classes)
    self._examples = {}
    for split, path in splits.items():
      examples = [(f, label) for label, c in enumerate(classes)
                  for f in _images(os.path.join(path, c))]
      random.Random(split).shuffle(examples)
      self._examples[split] = examples

  def size(self, split: str, limit: int = 0) -> int:
    return len(self._split(split)[:limit or None])

  def records(self, split: str, *, limit: int = 0, index: int = 0, count: int = 1,
              shuffle_seed: Optional[int] = None):
    del shuffle_seed  # one file per example: the pipeline's permutation or buffer shuffles them
    examples = self._split(split)[:limit or None]
    start, end = share_bounds(len(examples), index, count)
    paths = [p for p, _ in examples[start:end]]
    labels = np.array([label for _, label in examples[start:end]], np.int32)
    return tf.data.Dataset.from_tensor_slices(
        {'image': tf.constant(paths, tf.string), 'label': labels})

  def decode(self, path):
    contents = tf.io.read_file(path)
    known = tf.reduce_any([tf.strings.substr(contents, 0, len(m)) == m for m in _MAGIC])
    tf.debugging.Assert(known, ['not a JPEG, PNG, GIF or BMP image:', path])
    return tf.io.decode_image(contents, channels=3, expand_animations=False)

  def undecodable(self, split: str) -> Optional[str]:
    """The first file of `split` that fails to decode, if any (slow: for error messages)."""
    for path, _ in self._split(split):
      try:
        self.decode(tf.constant(path))
      except tf.errors.InvalidArgumentError:
        return path
    return None

  def _split(self, split: str):
    if split not in self._examples and split == 'test' and 'valid' in self._examples:
      split = 'valid'
    if split not in self._examples:
      raise UserError(f'image_folder: {self._root} has no {split}/ folder '
                      f'(found: {", ".join(sorted(self._examples)) or "none"}).')
    if not self._examples[split]:
      raise UserError(f'image_folder: {self._root}/{split} has no images '
                      f'({", ".join(IMAGE_EXTENSIONS)}) in class folders.')
    return self._examples[split]


_MAGIC = (b'\xff\xd8\xff', b'\x89PNG', b'GIF8', b'BM')


def _subfolders(path):
  return sorted(f.rstrip('/') for f in tf.io.gfile.listdir(path)
                if tf.io.gfile.isdir(os.path.join(path, f)))


def _images(path):
  if not tf.io.gfile.isdir(path):
    return []
  return sorted(os.path.join(path, f) for f in tf.io.gfile.listdir(path)
                if f.lower().endswith(IMAGE_EXTENSIONS))


def _limited(split: str, limit: int) -> str:
  return f'{split}[:{limit}]' if limit else split


def _not_prepared(builder) -> str:
  root, name = os.fspath(builder.data_dir_root), builder.name
  if name == 'imagenet2012':
    manual = os.path.join(root, 'downloads', 'manual')
    return (f'imagenet2012 is not prepared in {root} (no {builder.data_dir}): put '
            f'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {manual}/ and run '
            f'`tfds build imagenet2012 --data_dir={root}`.')
  return (f'{name} is not prepared in {root} (no {builder.data_dir}): run '
          f'`tfds build {name} --data_dir={root}`.')


def _own_builder(ds_config):
  """Our offline builder of `ds_config.name`, built into the data_dir on first use."""
  # pylint: disable=g-import-not-at-top
  if ds_config.name == 'digits':
    from afd_jax.data.builders.digits import Digits
    builder = Digits(data_dir=ds_config.data_dir or None)
  else:
    from afd_jax.data.builders.fashion_mnist_local import FashionMnistLocal
    builder = FashionMnistLocal(data_dir=ds_config.data_dir or None, source_dir=ds_config.folder)
  # pylint: enable=g-import-not-at-top
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder

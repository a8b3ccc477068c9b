"""The TensorFlow side of segmentation data: config -> source, joint augmentation, streams.

Batches are {'image': float32 [b, S, S, C], 'label': int32 [b, S, S]} with S =
`dataset.image_size` (eval batches add 'mask', 0 on padding). Training draws the order and
every augmentation as the classification streams do (`pipeline.epoch_order`, stateless keys
from (seed, shard, epoch, position)), so a batch is a pure function of them and a restart is
exact. The share's records (encoded files or paths) are held in memory; each example is decoded,
checked (`joint_augment.checked_pair`) and augmented (`joint_augment.train_pair`) when used.
"""
import re
from typing import Iterator, Optional

import numpy as np

from afd_jax.data import DatasetInfo, local_batch_size, num_eval_batches, steps_per_epoch
from afd_jax.data import api, joint_augment, pipeline, segmentation_sources
from afd_jax.data.augment import normalize
from afd_jax.data.tfimport import tf
from afd_jax.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE


def _check(config, source) -> None:
  d = config.dataset
  if len(d.mean) != source.channels or len(d.std) != source.channels or min(d.std) <= 0:
    raise UserError(f'dataset.mean {tuple(d.mean)} and dataset.std {tuple(d.std)} need '
                    f'{source.channels} values (std > 0) for {source.name}.')
  low, high = (float(v) for v in d.get('scale', (0.5, 2.0)))
  if not 0 < low <= high:
    raise UserError(f'dataset.scale={tuple(d.get("scale"))} must be (low, high), 0 < low <= '
                    'high.')
  if d.image_size < 1 or d.shuffle_buffer:
    raise UserError('segmentation: dataset.image_size must be >= 1 (the crop) and '
                    'dataset.shuffle_buffer 0 (the records are held in memory).')


def dataset_info(config, *, process_count: int = 1,
                 num_devices: Optional[int] = None) -> DatasetInfo:
  d = config.dataset
  api.check_batch_sizes(config, process_count, num_devices)
  source = segmentation_sources.open_source(d)
  _check(config, source)
  return DatasetInfo(name=d.name, num_classes=source.num_classes,
                     image_shape=(d.image_size, d.image_size, source.channels),
                     num_train=api.train_size(config, source),
                     num_eval=source.size(d.eval_split), dense=True)


def train_iterator(config, info: DatasetInfo, *, start_step: int, process_index: int,
                   process_count: int) -> Iterator[dict]:
  return api.process_batches(_shard_batches, config, info, start_step, process_index,
                             process_count)


def _shard_batches(config, info: DatasetInfo, shard: int, shards: int, start_step: int,
                   process_count: int) -> Iterator[dict]:
  d = config.dataset
  source = segmentation_sources.open_source(d)
  b = local_batch_size(config.batch_size, shards)
  per_epoch = steps_per_epoch(config, info, process_count)
  records = list(source.records(d.train_split, limit=d.train_subset, index=shard,
                                count=shards).batch(8192).as_numpy_iterator())
  records = {k: np.concatenate([r[k] for r in records]) for k in records[0]}
  crop, scale = d.image_size, tuple(float(v) for v in d.get('scale', (0.5, 2.0)))

  def examples():
    epoch, step = divmod(start_step, per_epoch)
    while True:
      order = pipeline.epoch_order(config.seed, shard, epoch, len(records['name']))
      for position in range(step * b, per_epoch * b):
        i = order[position]
        yield {**{k: v[i] for k, v in records.items()}, 'epoch': epoch, 'position': position}
      epoch, step = epoch + 1, 0

  spec = {k: tf.TensorSpec([], tf.string) for k in records}
  spec.update(epoch=tf.TensorSpec([], tf.int64), position=tf.TensorSpec([], tf.int64))

  def prepare(x):
    image, mask = source.decode(x)
    key = _key(config.seed, shard, x['epoch'], x['position'])
    image, mask = joint_augment.train_pair(image, mask, key, crop, scale, d.random_flip)
    return {'image': tf.ensure_shape(image, info.image_shape),
            'label': tf.ensure_shape(tf.cast(mask, tf.int32), info.image_shape[:2])}

  ds = tf.data.Dataset.from_generator(examples, output_signature=spec).map(prepare, AUTOTUNE)
  ds = ds.batch(b, drop_remainder=True).map(
      lambda x: {'image': normalize(x['image'], d.mean, d.std), 'label': x['label']}, AUTOTUNE)
  return user_errors(pipeline.deterministic(ds.prefetch(AUTOTUNE)).as_numpy_iterator())


def eval_iterator(config, info: DatasetInfo, *, process_index: int,
                  process_count: int) -> Iterator[dict]:
  d = config.dataset
  source = segmentation_sources.open_source(d)
  batch_size = local_batch_size(config.eval_batch_size, process_count, 'eval_batch_size')

  def prepare(r):
    image, mask = joint_augment.eval_pair(*source.decode(r), d.image_size)
    return {'image': tf.ensure_shape(image, info.image_shape),
            'label': tf.ensure_shape(tf.cast(mask, tf.int32), info.image_shape[:2])}

  records = source.records(d.eval_split, index=process_index, count=process_count)
  ds = records.map(prepare, AUTOTUNE).batch(batch_size).map(
      lambda x: {'image': normalize(x['image'], d.mean, d.std), 'label': x['label']}, AUTOTUNE)

  def batches():
    count = 0
    for x in pipeline.deterministic(ds).as_numpy_iterator():
      yield pipeline.padded(x['image'], x['label'], batch_size)
      count += 1
    empty_labels = np.zeros((0,) + info.image_shape[:2], np.int32)
    for _ in range(count, num_eval_batches(config, info, process_count)):
      yield pipeline.padded(np.zeros((0,) + info.image_shape, np.float32), empty_labels,
                             batch_size)
  return user_errors(batches())


def _key(seed: int, shard: int, epoch, position):
  key = tf.constant([seed, shard], tf.int64)
  for value in (epoch, position):
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
  return key


def user_errors(batches: Iterator[dict],
                decode_error=tf.errors.InvalidArgumentError) -> Iterator[dict]:
  """A failed check or decode becomes a one-line UserError naming the file or example."""
  try:
    yield from batches
  except decode_error as e:
    message = segmentation_sources.undecodable_message(e)
    raise UserError(re.sub(r'\s+', ' ', message)) from None

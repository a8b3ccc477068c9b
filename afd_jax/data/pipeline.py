"""Training and eval batches as tf.data pipelines.

Batch k of a training stream is global step k, of epoch k // steps_per_epoch; every epoch uses
the first steps_per_epoch * batch_size examples of its order, so all processes stay in step.
- shuffle_buffer = 0: the process's share is held in memory (decoded, or as encoded files or
  paths) and permuted every epoch by `epoch_order`. A stream started at step k reads nothing
  before it.
- shuffle_buffer > 0 (for splits too large for memory): every epoch reads the share's files in an
  order seeded by `epoch_seed` through a shuffle buffer with the same seed. A stream started at
  step k re-reads the first k % steps_per_epoch batches of its epoch, and drops them.
Random augmentations draw from stateless keys folded from (seed, shard, epoch) and the
step (per-batch draws) or the example's position in the epoch (per-example draws), so a batch is
a pure function of (seed, shard, epoch, position), and a restart is exact. A shard is one of
the disjoint shares of the split (`dataset.num_shards`, one per process by default).
In-memory streams also yield each example's `index`: int32, its position in the whole training
split (the share's first position + its position in the share), for methods that keep
per-example state (CRD's memory banks); a streamed share cannot know it and yields none.
"""
import dataclasses
from typing import Callable, Iterator, Optional

import numpy as np

from afd_jax.data.augment import Augment
from afd_jax.data.tfimport import tf

AUTOTUNE = tf.data.AUTOTUNE
_BATCH_DRAWS, _EXAMPLE_DRAWS = 0, 1


@dataclasses.dataclass(frozen=True)
class Stream:
  """Where a training stream starts and how it is cut."""
  seed: int
  shard: int
  batch_size: int  # this shard's part of the global batch
  steps_per_epoch: int
  start_step: int


def epoch_seed(seed: int, shard: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed % 2**32, shard, epoch]).generate_state(1)[0])


def epoch_order(seed: int, shard: int, epoch: int, n: int) -> np.ndarray:
  """The permutation of a shard of n examples in `epoch`."""
  return np.random.RandomState(epoch_seed(seed, shard, epoch)).permutation(n)


def load(records, decode: Optional[Callable] = None):
  """(images, int32 labels) of `records` in memory: decoded uint8 [N, H, W, C] if `decode` is
  given, else the records' encoded files or paths as an object array."""
  if decode is not None:
    records = records.map(lambda r: {'image': decode(r['image']), 'label': r['label']}, AUTOTUNE)
  parts = list(records.batch(4096).as_numpy_iterator())
  return (np.concatenate([p['image'] for p in parts]),
          np.concatenate([p['label'] for p in parts]).astype(np.int32))


def memory_batches(images, labels, stream: Stream, augment: Augment,
                   decode: Optional[Callable] = None, first_index: int = 0) -> Iterator[dict]:
  """The infinite training stream of a share in memory (see `load`); `decode` for encoded images.
  `first_index`: the share's first position in the training split; batches carry `index`,
  `first_index` + each example's position in the share (int32)."""
  b = stream.batch_size

  def orders():
    epoch, step = divmod(stream.start_step, stream.steps_per_epoch)
    while True:
      order = epoch_order(stream.seed, stream.shard, epoch, len(labels))
      for k in range(step, stream.steps_per_epoch):
        yield epoch, k, order[k * b:(k + 1) * b]
      epoch, step = epoch + 1, 0

  scalar = tf.TensorSpec([], tf.int64)
  if decode is None and not augment.resizes:  # gather and augment whole batches
    def batches():
      for epoch, k, idx in orders():
        yield {'image': images[idx], 'label': labels[idx],
               'index': (first_index + idx).astype(np.int32), 'epoch': epoch, 'step': k}
    spec = {'image': tf.TensorSpec((b,) + images.shape[1:], tf.uint8),
            'label': tf.TensorSpec([b], tf.int32), 'index': tf.TensorSpec([b], tf.int32),
            'epoch': scalar, 'step': scalar}
    ds = tf.data.Dataset.from_generator(batches, output_signature=spec)
  else:
    def examples():
      for epoch, k, idx in orders():
        for position, i in enumerate(idx, k * b):
          yield {'image': images[i], 'label': labels[i], 'index': np.int32(first_index + i),
                 'epoch': epoch, 'position': position}
    image = (tf.TensorSpec(images.shape[1:], tf.uint8) if decode is None
             else tf.TensorSpec([], tf.string))
    spec = {'image': image, 'label': tf.TensorSpec([], tf.int32),
            'index': tf.TensorSpec([], tf.int32), 'epoch': scalar, 'position': scalar}
    ds = _batch_examples(tf.data.Dataset.from_generator(examples, output_signature=spec),
                         stream, augment, decode)
  return _finish_train(ds, stream, augment).as_numpy_iterator()


def streamed_batches(records: Callable[[int], 'tf.data.Dataset'], stream: Stream,
                     augment: Augment, decode: Callable, buffer: int) -> Iterator[dict]:
  """The infinite training stream of a share read from files: `records(seed)` yields its
  records, the files read in that seed's order; `decode` decodes their images."""
  epoch, step = divmod(stream.start_step, stream.steps_per_epoch)
  while True:
    seed = epoch_seed(stream.seed, stream.shard, epoch)
    ds = records(seed).shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
    ds = ds.take(stream.steps_per_epoch * stream.batch_size).enumerate()
    ds = ds.skip(step * stream.batch_size).map(
        lambda position, r, e=epoch: {**r, 'epoch': tf.constant(e, tf.int64), 'position': position})
    yield from _finish_train(_batch_examples(ds, stream, augment, decode), stream,
                             augment).as_numpy_iterator()
    epoch, step = epoch + 1, 0


def eval_batches(records, augment: Augment, decode: Callable, batch_size: int,
                 num_batches: int) -> Iterator[dict]:
  """`records` in order, in batches of `batch_size` with a float32 `mask` (0 for padding), padded
  with all-padding batches to `num_batches`."""
  shape = augment.output_shape

  def prepare(r):
    image = tf.ensure_shape(augment.eval_example(decode(r['image'])), shape)
    return {'image': image, 'label': r['label']}

  ds = records.map(prepare, AUTOTUNE).batch(batch_size).map(
      lambda x: {'image': augment.eval_batch(x['image']), 'label': x['label']}, AUTOTUNE)
  count = 0
  for x in deterministic(ds).as_numpy_iterator():
    yield padded(x['image'], x['label'], batch_size)
    count += 1
  for _ in range(count, num_batches):
    yield padded(np.zeros((0,) + shape, np.float32), np.zeros([0], np.int32), batch_size)


def _batch_examples(ds, stream: Stream, augment: Augment, decode: Optional[Callable]):
  """Examples {image, label, [index,] epoch, position} -> batches {image, label, [index,]
  epoch, step}."""
  b = stream.batch_size

  def prepare(x):
    image = x['image'] if decode is None else decode(x['image'])
    key = _key(stream, x['epoch'], _EXAMPLE_DRAWS, x['position'])
    return {**x, 'image': tf.ensure_shape(augment.train_example(image, key), augment.output_shape)}

  ds = ds.map(prepare, AUTOTUNE).batch(b, drop_remainder=True)
  return ds.map(lambda x: {'image': x['image'], 'label': x['label'], **_index(x),
                           'epoch': x['epoch'][0], 'step': x['position'][0] // b})


def _finish_train(ds, stream: Stream, augment: Augment):
  def finish(x):
    key = _key(stream, x['epoch'], _BATCH_DRAWS, x['step'])
    return {'image': augment.train_batch(x['image'], key), 'label': x['label'], **_index(x)}
  return deterministic(ds.map(finish, AUTOTUNE).prefetch(AUTOTUNE))


def _index(x) -> dict:
  """{'index': x['index']} where the stream knows the examples' indices (in memory), else {}."""
  return {'index': x['index']} if 'index' in x else {}


def _key(stream: Stream, epoch, draws: int, position):
  key = tf.constant([stream.seed, stream.shard], tf.int64)
  for data in (epoch, draws, position):
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))
  return key


def deterministic(ds):
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def padded(image, label, batch_size: int) -> dict:
  n, pad = len(label), batch_size - len(label)
  return {'image': np.pad(image, [(0, pad)] + [(0, 0)] * (image.ndim - 1)),
          'label': np.pad(label, [(0, pad)] + [(0, 0)] * (label.ndim - 1)),
          'mask': (np.arange(batch_size) < n).astype(np.float32)}

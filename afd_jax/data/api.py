"""The TensorFlow side of `afd_jax.data`'s entry points: config -> source, augmentation, stream."""
import functools
import re
from typing import Iterator, Optional

import numpy as np

from afd_jax.data import (DatasetInfo, local_batch_size, num_eval_batches, num_shards,
                          steps_per_epoch)
from afd_jax.data import pipeline, sources
from afd_jax.data.augment import Augment
from afd_jax.data.tfimport import tf
from afd_jax.errors import UserError


def dataset_info(config, *, process_count: int = 1,
                 num_devices: Optional[int] = None) -> DatasetInfo:
  d = config.dataset
  check_batch_sizes(config, process_count, num_devices)
  if d.train_subset < 0 or d.shuffle_buffer < 0:
    raise UserError('dataset.train_subset and dataset.shuffle_buffer must be >= 0.')
  source, augment = _open(config)
  return DatasetInfo(name=d.name, num_classes=source.num_classes,
                     image_shape=augment.output_shape, num_train=train_size(config, source),
                     num_eval=source.size(d.eval_split))


def check_batch_sizes(config, process_count: int, num_devices: Optional[int]) -> None:
  """UserError unless the global batch sizes divide over the processes and devices."""
  local_batch_size(config.batch_size, process_count)
  local_batch_size(config.eval_batch_size, process_count, 'eval_batch_size')
  for what in ('batch_size', 'eval_batch_size'):
    if num_devices and config[what] % num_devices:
      raise UserError(f'{what}={config[what]} must be a multiple of the {num_devices} devices.')


def train_size(config, source) -> int:
  """The training split's size after `dataset.train_subset`; UserError if the subset exceeds
  the split or the split holds less than one global batch."""
  d = config.dataset
  if d.train_subset < 0:
    raise UserError('dataset.train_subset must be >= 0.')
  num_train = source.size(d.train_split)
  if d.train_subset > num_train:
    raise UserError(f'dataset.train_subset={d.train_subset} exceeds the {num_train} examples of '
                    f'{source.name} {d.train_split}.')
  num_train = d.train_subset or num_train
  if num_train < config.batch_size:
    raise UserError(f'{source.name} {d.train_split} has {num_train} examples, fewer than one '
                    f'global batch (batch_size={config.batch_size}).')
  return num_train


def train_iterator(config, info: DatasetInfo, *, start_step: int, process_index: int,
                   process_count: int) -> Iterator[dict]:
  return process_batches(_shard_batches, config, info, start_step, process_index,
                         process_count)


def process_batches(shard_batches, config, info: DatasetInfo, start_step: int,
                    process_index: int, process_count: int) -> Iterator[dict]:
  """This process's training batches: those of its shards (`shard_batches(config, info, shard,
  shards, start_step, process_count)` each), concatenated in shard order."""
  shards = num_shards(config, process_count)
  per_process = shards // process_count
  streams = [shard_batches(config, info, shard, shards, start_step, process_count)
             for shard in range(process_index * per_process, (process_index + 1) * per_process)]
  if per_process == 1:
    return streams[0]
  return ({k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
          for parts in zip(*streams))


def _shard_batches(config, info: DatasetInfo, shard: int, shards: int, start_step: int,
                   process_count: int) -> Iterator[dict]:
  """The training stream of one shard of the train split."""
  d = config.dataset
  stream = pipeline.Stream(config.seed, shard, local_batch_size(config.batch_size, shards),
                           steps_per_epoch(config, info, process_count), start_step)
  source, augment = _open(config)
  share = functools.partial(source.records, d.train_split, limit=d.train_subset,
                            index=shard, count=shards)
  if d.shuffle_buffer:
    batches = pipeline.streamed_batches(lambda seed: share(shuffle_seed=seed), stream, augment,
                                        source.decode, d.shuffle_buffer)
  else:  # in memory: batches carry each example's index in the (possibly subset) split
    first = sources.share_bounds(info.num_train, shard, shards)[0]
    if d.cache and source.image_shape is not None:
      images, labels = pipeline.load(share(), source.decode)
      batches = pipeline.memory_batches(images, labels, stream, augment, first_index=first)
    else:
      images, labels = pipeline.load(share())
      batches = pipeline.memory_batches(images, labels, stream, augment, source.decode,
                                        first_index=first)
  return _user_errors(batches, source, d.train_split)


def train_labels(config, info: DatasetInfo, process_count: int = 1) -> np.ndarray:
  d = config.dataset
  source, _ = _open(config)
  shards = num_shards(config, process_count)
  parts = []
  for shard in range(shards):  # share by share, read as the training stream reads each share
    records = source.records(d.train_split, limit=d.train_subset, index=shard, count=shards)
    start, end = sources.share_bounds(info.num_train, shard, shards)
    labels = np.concatenate(list(records.map(lambda ex: ex['label']).batch(8192)
                                 .as_numpy_iterator())).astype(np.int32)
    if len(labels) != end - start:
      raise UserError(f'{source.name} {d.train_split}: share {shard} of {shards} has '
                      f'{len(labels)} labels, expected {end - start}.')
    parts.append(labels)
  return np.concatenate(parts)


def eval_iterator(config, info: DatasetInfo, *, process_index: int,
                  process_count: int) -> Iterator[dict]:
  source, augment = _open(config)
  records = source.records(config.dataset.eval_split, index=process_index, count=process_count)
  batches = pipeline.eval_batches(
      records, augment, source.decode,
      local_batch_size(config.eval_batch_size, process_count, 'eval_batch_size'),
      num_eval_batches(config, info, process_count))
  return _user_errors(batches, source, config.dataset.eval_split)


def _open(config):
  source = sources.open_source(config.dataset)
  return source, Augment.from_config(config.dataset, source.image_shape, source.channels)


def _user_errors(batches: Iterator[dict], source, split: str,
                 decode_error=tf.errors.InvalidArgumentError) -> Iterator[dict]:
  """A decoding failure becomes a UserError naming the dataset and, for folders, the file.
  (`decode_error` is bound here: a generator closed at interpreter exit may outlive `tf`.)"""
  try:
    yield from batches
  except decode_error as e:
    detail = re.search(r'assertion failed: (.*)', e.message)
    detail = detail.group(1) if detail else e.message.split('}} ')[-1].splitlines()[0]
    culprit = source.undecodable(split) if isinstance(source, sources.FolderSource) else None
    raise UserError(f'{source.name}: cannot decode {culprit or "an image"}: {detail}') from None

"""Input pipelines: TFDS datasets, our offline `digits` / `fashion_mnist_local`, image folders;
for segmentation `fashion_mnist_scenes`, `oxford_iiit_pet` and folders of images with masks.

Importing this package does not import TensorFlow; the functions that need it import it.
Each process reads its own disjoint share of every split and yields host-local numpy batches of
`batch_size // process_count` examples; the engine assembles them into global arrays.
"""
import dataclasses
import math
from typing import Iterator, Optional, Tuple

from afd_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: Tuple[int, int, int]  # (H, W, C) of the arrays the iterators yield
  num_train: int                     # examples in the (possibly subset) train split, all processes
  num_eval: int                      # examples in the eval split, all processes
  dense: bool = False                # segmentation: labels are B x H x W masks (`is_dense`)


# Segmentation datasets (afd_jax/data/segmentation_sources.py): their batches' labels are masks.
DENSE_NAMES = ('fashion_mnist_scenes', 'oxford_iiit_pet', 'mask_folder')


def is_dense(config) -> bool:
  """Does `config.dataset` name a segmentation dataset?"""
  return config.dataset.name in DENSE_NAMES


def _api(config):
  """The TensorFlow side for `config.dataset`: classification's or segmentation's."""
  # pylint: disable=g-import-not-at-top
  if is_dense(config):
    from afd_jax.data import segmentation_api
    return segmentation_api
  from afd_jax.data import api
  return api


def dataset_info(config, *, process_count: int = 1,
                 num_devices: Optional[int] = None) -> DatasetInfo:
  """Validates `config` (batch sizes against the process and device counts where given) and the
  dataset, building `digits` / `fashion_mnist_local` on first use. Raises UserError."""
  return _api(config).dataset_info(config, process_count=process_count, num_devices=num_devices)


def train_iterator(config, info: DatasetInfo, *, start_step: int, process_index: int,
                   process_count: int) -> Iterator[dict]:
  """Infinite {'image': float32 [b, H, W, C], 'label': int32 [b]}, b = batch_size // process_count;
  batch k is global step k; starting at `start_step` continues an uninterrupted stream exactly.
  The process's rows are the batches of its shards (see `num_shards`), concatenated. Data held
  in memory (no `shuffle_buffer`) also gives 'index': int32 [b], each example's position in the
  training split (global over shards and processes), for methods with per-example state (CRD).
  Segmentation: 'label' is int32 [b, H, W], the masks (no 'index')."""
  return _api(config).train_iterator(config, info, start_step=start_step,
                                     process_index=process_index, process_count=process_count)


def train_labels(config, info: DatasetInfo, process_count: int = 1):
  """Every training example's label at its `index` (int32 [num_train], numpy), read share by
  share as `train_iterator` reads them (images left encoded); every process reads them all. For
  methods whose per-example state needs every label from the first step (CRD's negatives)."""
  from afd_jax.data import api  # pylint: disable=g-import-not-at-top
  return api.train_labels(config, info, process_count)


def eval_iterator(config, info: DatasetInfo, *, process_index: int,
                  process_count: int) -> Iterator[dict]:
  """One pass over this process's eval share: {'image', 'label', 'mask'} batches of
  eval_batch_size // process_count, `mask` 0 on padding; `num_eval_batches` batches."""
  return _api(config).eval_iterator(config, info, process_index=process_index,
                                    process_count=process_count)


def local_batch_size(global_batch: int, process_count: int, what: str = 'batch_size') -> int:
  if global_batch < 1 or global_batch % process_count:
    raise UserError(f'{what}={global_batch} must be a positive multiple of the {process_count} '
                    'processes.')
  return global_batch // process_count


def num_shards(config, process_count: int) -> int:
  """How many disjoint shares the training split is cut into (`dataset.num_shards`, 0 = one per
  process). Each process reads `num_shards / process_count` whole shares; the global batch is
  the concatenation of the shares' batches in shard order, so a run with a fixed `num_shards`
  sees the same batches on any number of processes (1 process x 8 devices = 2 x 4)."""
  n = config.dataset.num_shards or process_count
  if n < 1 or n % process_count:
    raise UserError(f'dataset.num_shards={n} must be a positive multiple of the '
                    f'{process_count} processes.')
  return n


def steps_per_epoch(config, info: DatasetInfo, process_count: int) -> int:
  """Batches per epoch: the smallest shard over the shard's part of the global batch."""
  n = num_shards(config, process_count)
  return (info.num_train // n) // local_batch_size(config.batch_size, n, 'batch_size (per shard)')


def num_eval_batches(config, info: DatasetInfo, process_count: int) -> int:
  """Eval batches per process: enough for the largest share."""
  local = local_batch_size(config.eval_batch_size, process_count, 'eval_batch_size')
  return math.ceil(math.ceil(info.num_eval / process_count) / local)

"""Evaluation: this process's eval batches, built once and reused, and the top-1/top-5/loss
over them with the sums kept on the devices."""
import functools
from typing import Dict, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from afd_jax import data, dense_metrics, sharding
from afd_jax.state import student_variables


EVAL_IN_MEMORY_BYTES = 1 << 30  # a process's eval share up to this size is read once, then kept


class EvalBatches:
  """This process's eval batches (`data.eval_iterator`), the same ones at every pass: kept as
  host arrays after the first pass where they take at most EVAL_IN_MEMORY_BYTES, else read
  again from the deterministic pipeline at each pass."""

  def __init__(self, config, info: data.DatasetInfo):
    processes = jax.process_count()
    self._read = functools.partial(data.eval_iterator, config, info,
                                   process_index=jax.process_index(), process_count=processes)
    examples = (data.num_eval_batches(config, info, processes)
                * data.local_batch_size(config.eval_batch_size, processes, 'eval_batch_size'))
    # float32 images, an int32 label (segmentation: one per pixel) and a float32 mask each
    label = int(np.prod(info.image_shape[:2])) if info.dense else 1
    self._keep = examples * (4 * int(np.prod(info.image_shape)) + 4 * label + 4) <= (
        EVAL_IN_MEMORY_BYTES)
    self._kept = None

  def __iter__(self) -> Iterator[dict]:
    if self._kept is not None:
      return iter(self._kept)
    return self._read_and_keep() if self._keep else self._read()

  def _read_and_keep(self) -> Iterator[dict]:
    batches = []
    for batch in self._read():
      batches.append(batch)
      yield batch
    self._kept = batches  # a whole pass only


@jax.jit
def _add_sums(totals, sums):
  return jax.tree.map(jnp.add, totals, sums)


def evaluate(eval_step, variables, batches: EvalBatches, mesh) -> Dict[str, float]:
  """Top-1/top-5 (%) and loss over every eval example exactly once; for segmentation mIoU and
  pixel accuracy (%), each class's IoU and the per-pixel loss, from one confusion matrix. The
  sums stay on the devices (one compiled add a batch, dispatched without waiting) and are
  fetched at the end."""
  totals = None
  for batch in batches:
    sums = eval_step(variables, sharding.global_batch(batch, mesh))
    totals = sums if totals is None else _add_sums(totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  if 'confusion' in totals:  # segmentation (step.dense_sums)
    scores = dense_metrics.from_confusion(totals['confusion'])
    return {'miou': scores['miou'], 'pixel_accuracy': scores['pixel_accuracy'],
            'loss': float(totals['loss_sum']) / max(float(totals['pixels']), 1.0),
            'count': int(totals['count']), 'class_iou': scores['class_iou']}
  return {'top1': 100 * float(totals['correct1']) / count,
          'top5': 100 * float(totals['correct5']) / count,
          'loss': float(totals['loss_sum']) / count, 'count': int(totals['count'])}


def evaluate_student(eval_step, state, batches: EvalBatches, mesh) -> Dict[str, float]:
  """`evaluate` of the student; where the run keeps a moving average of it, also of that
  (`ema_top1`, `ema_top5`, `ema_loss`)."""
  out = evaluate(eval_step, student_variables(state), batches, mesh)
  if state.ema:
    ema = evaluate(eval_step, state.ema, batches, mesh)
    out.update({f'ema_{k}': v for k, v in ema.items() if k not in ('count', 'class_iou')})
  return out


headline = dense_metrics.headline


def describe(metrics: Dict[str, float], loss: bool = True) -> str:
  """The eval metrics in a log line: top-1/top-5, or mIoU and pixel accuracy; and the loss."""
  if 'miou' in metrics:
    line = f'miou {metrics["miou"]:.2f} pixel_accuracy {metrics["pixel_accuracy"]:.2f}'
  else:
    line = f'top1 {metrics["top1"]:.2f} top5 {metrics["top5"]:.2f}'
  return line + (f' loss {metrics["loss"]:.4f}' if loss else '')


def scalars(metrics: Dict[str, float]) -> Dict[str, float]:
  """The metrics that are single numbers (for TensorBoard), each class's IoU left out."""
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

"""Segmentation metrics: a confusion matrix counted on the devices, and mIoU / pixel accuracy
read from it on the host.

Written here: clu's metrics average per-batch values, and mIoU is not an average of per-batch
IoUs; it needs the whole split's counts, which one confusion matrix holds.
"""
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from afd_jax.pixels import IGNORE_INDEX


def headline(metrics: Dict[str, float]) -> str:
  """The eval metric a run is ranked by (best checkpoint, study tables): 'miou' for
  segmentation, else 'top1'."""
  return 'miou' if 'miou' in metrics else 'top1'


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int,
                     ignore_index: int = IGNORE_INDEX,
                     mask: Optional[jax.Array] = None) -> jax.Array:
  """`num_classes x num_classes` int32 counts: row = true class, column = predicted class.

  `predictions`, `labels`: `B x H x W` integers. A pixel counts unless its label is
  `ignore_index` (or outside [0, num_classes)) or its example's `mask` (`B`) is 0 (padding).
  int32 holds up to 2**31 - 1 pixels per (true, predicted) pair.
  """
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
  if mask is not None:
    valid &= mask.reshape((-1,) + (1,) * (labels.ndim - 1)).astype(bool)
  pair = jnp.where(valid, labels * num_classes + predictions.astype(jnp.int32), 0)
  counts = jax.ops.segment_sum(valid.astype(jnp.int32).reshape(-1), pair.reshape(-1),
                               num_segments=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def from_confusion(confusion) -> Dict[str, object]:
  """mIoU and pixel accuracy (%) of a confusion matrix, and each class's IoU (NaN for a class
  absent from both truth and prediction, which the mean leaves out, as mmsegmentation does)."""
  confusion = np.asarray(confusion, np.float64)
  true_positive = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_positive
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, true_positive / union, np.nan)
  total = confusion.sum()
  present = ~np.isnan(iou)
  return {'miou': 100 * float(np.mean(iou[present])) if present.any() else 0.0,
          'pixel_accuracy': 100 * float(true_positive.sum() / total) if total else 0.0,
          'class_iou': [None if np.isnan(v) else 100 * float(v) for v in iou],
          'pixels': int(total)}

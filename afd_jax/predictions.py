"""A segmentation run's predictions on its first eval images, drawn beside the truth (and the
teacher's) as `predictions.png` in the workdir."""
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from afd_jax import viz
from afd_jax.pixels import IGNORE_INDEX

SHOWN = 4  # images drawn


def first_eval_images(eval_batches, count: int = SHOWN):
  """(images, labels) of the first `count` real examples of the eval batches (host arrays)."""
  batch = next(iter(eval_batches))
  keep = int(min(count, batch['mask'].sum()))
  return batch['image'][:keep], batch['label'][:keep]


def predicted(model, variables, images) -> np.ndarray:
  """The per-pixel argmax of `model` on `images` (inference mode)."""
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  return np.argmax(np.asarray(logits), -1)


def write(workdir: str, eval_batches, num_classes: int, student, student_variables,
          teacher=None, teacher_variables=None, teacher_images=None) -> str:
  """Writes `workdir/predictions.png` (process 0 only): image, truth, student, and the teacher
  where there is one (`teacher_images`: the images as the teacher takes them)."""
  path = os.path.join(workdir, 'predictions.png')
  if jax.process_count() > 1:  # every process takes part; process 0 then draws on host copies
    student_variables, teacher_variables = multihost_utils.process_allgather(
        (student_variables, teacher_variables), tiled=True)
  if jax.process_index() != 0:
    return path
  images, labels = first_eval_images(eval_batches)
  columns = [('truth', labels), ('student', predicted(student, student_variables, images))]
  if teacher is not None:
    seen = images if teacher_images is None else np.asarray(teacher_images(images))
    columns.append(('teacher', predicted(teacher, teacher_variables, seen)))
  return viz.plot_predictions(images, columns, num_classes, path, IGNORE_INDEX)

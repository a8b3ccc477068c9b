"""Metric writers (TensorBoard events + console, process 0 only), progress/ETA, reductions.

Step metrics stay on the device until a log step, so the step loop never waits on the host.
"""
import math
import time
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np


class Writer:
  """TensorBoard events under `workdir` and console lines, written by process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._writer = None
    if self.enabled:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._writer = metric_writers.create_default_writer(workdir, asynchronous=False)

  def scalars(self, step: int, values: Dict[str, float]) -> None:
    if self.enabled:
      self._writer.write_scalars(step, values)

  def console(self, message: str) -> None:
    if self.enabled:
      print(message, flush=True)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


def mean_metrics(history: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  """Mean of each metric over the fetched step metrics that have it (a pre-training stage's
  steps report other terms than the main training's)."""
  keys = list(dict.fromkeys(k for h in history for k in h))
  return {k: np.mean([h[k] for h in history if k in h], axis=0) for k in keys}


def first_non_finite(history: Sequence[Dict[str, np.ndarray]], first_step: int) -> Optional[str]:
  """A message naming the first step and loss term that is not finite, or None."""
  for i, metrics in enumerate(history):
    terms = sorted(k for k in metrics if k not in ('loss', 'grad_norm', 'top1', 'pixel_accuracy',
                                                   'learning_rate', 'attention'))
    for name in (*terms, 'loss', 'grad_norm'):
      if name in metrics and not np.all(np.isfinite(metrics[name])):
        term = 'gradient' if name == 'grad_norm' else f'loss term {name!r}'
        return (f'non-finite {term} at step {first_step + i}: {name} = '
                f'{np.asarray(metrics[name]).ravel()[0]}')
  return None


class Progress:
  """Throughput and ETA between log steps."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int):
    self.total, self.batch = total_steps, global_batch
    self._last_step, self._last_time = start_step, time.time()
    self.start_time = self._last_time

  def update(self, step: int) -> Dict[str, float]:
    now = time.time()
    steps = max(step - self._last_step, 1)
    step_time = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    return {'step_time': step_time, 'images_per_sec': self.batch / max(step_time, 1e-9),
            'eta_sec': step_time * max(self.total - step, 0)}


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def format_terms(values: Dict[str, float], names: List[str]) -> str:
  return ' '.join(f'{n} {values[n]:.4f}' for n in names if n in values)

"""The train-state pytree: everything that changes during training, and nothing else.

Teacher variables are not in it: they are an input of the step, never updated or donated.
"""
from typing import Any, Dict

import flax
import jax
import optax


@flax.struct.dataclass
class TrainState:
  """`params`/`batch_stats` hold `{'student': ..., 'distiller': ...}` (the distiller's may be
  empty); `rng` is the base key, folded with the step inside the step."""
  step: jax.Array
  params: Dict[str, Any]
  batch_stats: Dict[str, Any]
  opt_state: optax.OptState
  rng: jax.Array


def student_variables(state: TrainState) -> Dict[str, Any]:
  return {'params': state.params['student'], 'batch_stats': state.batch_stats['student']}


def distiller_variables(state: TrainState) -> Dict[str, Any]:
  return {'params': state.params['distiller'], 'batch_stats': state.batch_stats['distiller']}

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
  empty); `rng` is the base key, folded with the step inside the step; `ema` is the moving
  average of the student's variables (`{'params', 'batch_stats'}`), empty where it is off."""
  step: jax.Array
  params: Dict[str, Any]
  batch_stats: Dict[str, Any]
  opt_state: optax.OptState
  rng: jax.Array
  ema: Dict[str, Any] = flax.struct.field(default_factory=dict)


def variables_of(part: str, params: Dict[str, Any], batch_stats: Dict[str, Any]):
  """The linen variables of `part` ('student' or 'distiller') from the state's (or a step's
  differentiated) `params` and `batch_stats`."""
  return {'params': params[part], 'batch_stats': batch_stats[part]}


def student_variables(state: TrainState) -> Dict[str, Any]:
  return variables_of('student', state.params, state.batch_stats)


def distiller_variables(state: TrainState) -> Dict[str, Any]:
  return variables_of('distiller', state.params, state.batch_stats)


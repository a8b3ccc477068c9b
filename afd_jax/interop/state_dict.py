"""Filling Flax variables from a PyTorch state_dict: layouts, and one error naming every problem.

Shared by the zoo's CNN converter (interop/torch.py) and the ViT one (interop/vit.py); each
supplies only how a Flax path is named in its state_dicts.
"""
from typing import Any, Callable, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

SHOWN = 12  # entries listed per kind of problem; the rest are counted


def to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  """PyTorch layout -> Flax: conv weights OIHW -> HWIO, linear weights transposed."""
  if leaf == 'kernel':
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  """Flax layout -> PyTorch (the inverse of `to_flax`)."""
  if leaf == 'kernel':
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


def torch_shape(leaf: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The PyTorch shape of a Flax leaf of `shape`."""
  if leaf == 'kernel':
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape[::-1])
  return tuple(shape)


def _listed(items) -> str:
  more = f' (+{len(items) - SHOWN} more)' if len(items) > SHOWN else ''
  return '; '.join(items[:SHOWN]) + more


def fill(abstract: Any, sd: Mapping[str, np.ndarray], key_of: Callable[[Any], str],
         what: str) -> Any:
  """`abstract` (a tree of shapes) filled from `sd`, whose entry for a Flax path is named
  `key_of(path)`; a ValueError listing every missing, unexpected and wrongly shaped entry."""
  missing, wrong, used = [], [], set()

  def take(path, leaf):
    key, name = key_of(path), path[-1].key
    if key not in sd:
      missing.append(key)
      return np.zeros(leaf.shape, leaf.dtype)
    used.add(key)
    value = to_flax(name, np.asarray(sd[key]))
    if tuple(value.shape) != tuple(leaf.shape):
      wrong.append(f'{key}: got {tuple(np.shape(sd[key]))}, expected '
                   f'{torch_shape(name, leaf.shape)}')
      return np.zeros(leaf.shape, leaf.dtype)
    return value.astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(take, abstract)
  problems = [f'{label}: {_listed(items)}' for label, items in (
      ('missing entries', sorted(missing)), ('unexpected entries', sorted(set(sd) - used)),
      ('wrongly shaped entries', wrong)) if items]
  if problems:
    raise ValueError(f'state_dict does not fit {what}: ' + ' | '.join(problems))
  return jax.tree.map(jnp.asarray, variables)

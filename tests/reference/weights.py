"""Deterministic stand-ins for stored weights and inputs, shared by make_vectors.py and the test.

The golden files keep only a seed, the state_dict's key names (in order) and their shapes;
`state_dict` redraws the same values on both sides with numpy, one key after another.
"""
from typing import Dict, Sequence

import numpy as np


def state_dict(seed: int, names: Sequence[str], shapes: Sequence[Sequence[int]],
               gain: float = 1.0) -> Dict[str, np.ndarray]:
  """float32 arrays for PyTorch parameter names (no `num_batches_tracked`).

  Batch norm (a module with a `running_mean`): weight 1 + 0.3 N, bias 0.2 N, running_mean
  0.1 N, running_var 1 + 0.5 U. Conv / Linear weights: N * gain / sqrt(fan_in); other biases
  0.1 N. AFD's `p_t`, `p_s`: Xavier-normal. N: standard normal, U: uniform on [0, 1).
  """
  rng = np.random.default_rng(seed)
  norms = {n.rsplit('.', 1)[0] for n in names if n.endswith('.running_mean')}
  out = {}
  for name, shape in zip(names, shapes):
    shape = tuple(int(s) for s in shape)
    module, leaf = name.rsplit('.', 1) if '.' in name else ('', name)
    normal = lambda: rng.standard_normal(shape)  # pylint: disable=cell-var-from-loop
    if module in norms:
      value = {'weight': lambda: 1 + 0.3 * normal(), 'bias': lambda: 0.2 * normal(),
               'running_mean': lambda: 0.1 * normal(),
               'running_var': lambda: 1 + 0.5 * rng.random(shape)}[leaf]()
    elif leaf == 'weight' and len(shape) >= 2:
      value = normal() * gain / np.sqrt(np.prod(shape[1:]))
    elif leaf == 'bias' and len(shape) == 1:
      value = 0.1 * normal()
    elif leaf in ('p_t', 'p_s') and len(shape) == 2:
      value = normal() * np.sqrt(2.0 / sum(shape))
    else:
      raise ValueError(f'no rule for {name} {shape}')
    out[name] = value.astype(np.float32)
  return out


def features(seed: int, shapes: Sequence[Sequence[int]]) -> list:
  """ReLU of Gaussian noise, float32, one array per (channels-last) shape."""
  rng = np.random.default_rng(seed)
  return [np.maximum(rng.standard_normal(tuple(int(s) for s in shape)), 0).astype(np.float32)
          for shape in shapes]


def images(seed: int, shape: Sequence[int]) -> np.ndarray:
  """Gaussian images, float32, channels-last."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal(tuple(int(s) for s in shape)).astype(np.float32)

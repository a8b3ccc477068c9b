"""Any model's classifier and its input (the embedding, or penultimate features).

The classifier is found, not declared: it is the last submodule call with parameters whose
output has the shape of the logits the model returns (`fc` of the CNNs, `head` of the ViTs, the last Dense of
a model from anywhere), and the embedding is its input, flattened to `B x D`. The search is a
Flax method interceptor, a trace-time hook: under `jit` the program holds only the arrays used.
"""
from typing import Any, List, Tuple

import flax.linen as nn
import jax


class _LastTwoDimCalls:
  """Records (path, input, output) of every submodule `__call__` that has parameters and
  returns `B x N` (a parameter-free layer after the classifier, e.g. dropout, is not it)."""

  def __init__(self):
    self.calls: List[Tuple[str, Any, Any]] = []

  def __call__(self, next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (context.method_name == '__call__' and context.module.path and args
        and hasattr(args[0], 'shape') and hasattr(out, 'shape') and out.ndim == 2
        and context.module.variables.get('params')):
      self.calls.append(('/'.join(str(p) for p in context.module.path), args[0], out))
    return out


def _classifier_call(calls, logits, model) -> Tuple[str, Any]:
  for path, x, out in reversed(calls):
    if tuple(out.shape) == tuple(logits.shape):
      return path, x
  raise ValueError(f'{type(model).__name__}: no submodule returns the logits '
                   f'({tuple(logits.shape)}), so its classifier and embedding cannot be found; '
                   'the last layer must be a module call (e.g. nn.Dense).')


def apply_with_embedding(model, variables, images, train: bool, **kwargs):
  """`model.apply(variables, images, train, **kwargs)` whose output `(logits, features)` gains
  the embedding: `(logits, features, embedding)` (and the state, where `mutable` is given)."""
  recorder = _LastTwoDimCalls()
  with nn.intercept_methods(recorder):
    result = model.apply(variables, images, train, **kwargs)
  (logits, features), state = (result if kwargs.get('mutable', False) is not False
                               else (result, None))
  _, x = _classifier_call(recorder.calls, logits, model)
  out = (logits, features, x.reshape(x.shape[0], -1))
  return out if state is None else (out, state)


def classifier_path(model, variables, image_shape) -> Tuple[str, ...]:
  """The module path of `model`'s classifier, e.g. ('fc',), found by one abstract trace."""
  recorder = _LastTwoDimCalls()

  def forward(variables, images):
    with nn.intercept_methods(recorder):
      return model.apply(variables, images, False)[0]

  logits = jax.eval_shape(forward, variables,
                          jax.ShapeDtypeStruct((2,) + tuple(image_shape), 'float32'))
  path, _ = _classifier_call(recorder.calls, logits, model)
  return tuple(path.split('/'))

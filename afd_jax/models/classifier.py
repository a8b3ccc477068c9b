"""Any model's classifier and its input (the embedding, or penultimate features).

The classifier is found, not declared: it is the last submodule call with parameters whose
output has the shape of the logits the model returns (`fc` of the CNNs, `head` of the ViTs, the last Dense of
a model from anywhere), and the embedding is its input, flattened to `B x D`. The search is a
Flax method interceptor, a trace-time hook: under `jit` the program holds only the arrays used.

A model with a distillation token (DeiT) declares its second head by name, the class attribute
`distillation_head`; `apply_with_dist_logits` returns that head's output by the same kind of hook.
"""
from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax

from afd_jax.layers import at_least_f32


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


def distillation_head(model) -> Optional[str]:
  """The name of `model`'s distillation head (class attribute `distillation_head`; looked up
  through a `Tapped` wrapper), or None."""
  while model is not None:
    name = getattr(type(model), 'distillation_head', None)
    if isinstance(name, str) and name:
      return name
    model = getattr(model, 'module', None)
  return None


def has_distillation_token(model) -> bool:
  """Does `model` have a distillation token and head (DeiT)?"""
  return distillation_head(model) is not None


class _HeadOutput:
  """Records the output of every `__call__` of the submodule named `name`."""

  def __init__(self, name: str):
    self.name, self.outputs = name, []

  def __call__(self, next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.name == self.name:
      self.outputs.append(out)
    return out


def apply_with_dist_logits(model, variables, images, train: bool, *, embedding: bool = False,
                           **kwargs):
  """`(result, dist_logits)`: `result` is what `model.apply(variables, images, train,
  **kwargs)` returns (`apply_with_embedding`'s, with `embedding`), `dist_logits` the float32
  `B x classes` output of the distillation head. ValueError for a model without one."""
  name = distillation_head(model)
  if name is None:
    raise ValueError(f'{type(model).__name__} has no distillation token and head.')
  recorder = _HeadOutput(name)
  with nn.intercept_methods(recorder):
    result = (apply_with_embedding(model, variables, images, train, **kwargs) if embedding
              else model.apply(variables, images, train, **kwargs))
  if len(recorder.outputs) != 1:
    raise ValueError(f'{type(model).__name__}: its distillation head {name!r} was called '
                     f'{len(recorder.outputs)} times in one forward pass, not once.')
  return result, at_least_f32(recorder.outputs[0])

"""Model variables from files: our run's workdir (its latest readable checkpoint), an exported
`.msgpack`, or a PyTorch .pth; for teachers and student initialisation, each checked against the
model's shapes before training starts. Also writes the `.msgpack` files (python -m afd_jax.export).
"""
import os
from typing import Any, Dict, Tuple

import jax
import numpy as np
from etils import epath
from flax import serialization

from afd_jax import checkpoint
from afd_jax.errors import UserError, warn


def restore_raw_variables(workdir: str, collection_key: str = 'student') -> Tuple[Dict, Dict]:
  """Model variables and meta of another run's latest readable checkpoint, as numpy arrays."""
  ckpt = checkpoint.Checkpoints(workdir, create=False, async_save=False)
  for step in reversed(ckpt.steps()):
    try:
      meta = ckpt.read_meta(step)
      state = ckpt.read_state(step)
      variables = {'params': state['params'][collection_key],
                   'batch_stats': state['batch_stats'][collection_key]}
      return variables, meta
    except Exception as e:  # pylint: disable=broad-except
      warn(f'checkpoint {ckpt.directory / str(step)} cannot be read and is skipped '
            f'({type(e).__name__}).')
  raise UserError(f'no readable checkpoint in {ckpt.directory}.')


def export_variables(workdir: str, path: str, model_name: str) -> None:
  """Writes the student variables of `workdir`'s latest readable checkpoint to `path` as Flax
  msgpack (`{'model', 'variables'}`): one small file that `teacher.checkpoint` and
  `student.init_checkpoint` read."""
  variables, meta = restore_raw_variables(workdir)
  saved = meta.get('fingerprint', {}).get('student.name', model_name)
  if saved != model_name:
    raise UserError(f'{workdir} holds a {saved!r} model, not {model_name!r}.')
  payload = {'model': model_name, 'variables': variables}
  epath.Path(path).write_bytes(serialization.msgpack_serialize(payload))


def read_msgpack_variables(path: str, name: str, what: str) -> Dict[str, Any]:
  """Variables of model `name` from a file written by `export_variables`."""
  try:
    payload = serialization.msgpack_restore(epath.Path(path).read_bytes())
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises many types)
    raise UserError(f'{what} {path} is not a Flax msgpack file ({type(e).__name__}).') from e
  if not isinstance(payload, dict) or 'variables' not in payload:
    raise UserError(f'{what} {path} holds no model variables (expected a file written by '
                    'python -m afd_jax.export).')
  if payload.get('model', name) != name:
    raise UserError(f'{what} {path} holds a {payload["model"]!r} model, not {name!r}.')
  return payload['variables']


def load_teacher(config, model, num_classes: int, image_shape) -> Dict[str, Any]:
  """Teacher variables from `config.teacher.checkpoint`: one of our workdirs, an exported
  `.msgpack` or a PyTorch .pth.

  Validates the model name, class count and every shape before training starts.
  """
  path = config.teacher.checkpoint
  if path == 'random':  # Tests and benchmarks only: an untrained teacher.
    warn('teacher.checkpoint=random: distilling from an untrained teacher.')
    images = jax.numpy.zeros((2,) + tuple(image_shape))
    return jax.jit(lambda k: model.init(k, images, train=False))(jax.random.PRNGKey(config.seed + 1))
  if not path:
    raise UserError(f'method {config.method!r} needs a teacher: set config.teacher.checkpoint to '
                    'a workdir of a teacher run or a PyTorch .pth file.')
  return load_model_variables(path, config.teacher.name, model, num_classes, image_shape,
                              'teacher checkpoint')


def load_model_variables(path: str, name: str, model, num_classes: int, image_shape, what: str,
                         new_head_ok: bool = False) -> Dict[str, Any]:
  """Variables of model `name` from our workdir, a `.msgpack` or a .pth, checked against
  `model`'s shapes.

  With `new_head_ok`, a classifier (`fc`) of another class count is replaced by a fresh one
  (transfer learning); otherwise it is an error.
  """
  if not epath.Path(path).exists():
    raise UserError(f'{what} {path} does not exist.')
  if epath.Path(path).is_dir():
    if not checkpoint.has_checkpoints(path):
      raise UserError(f'{what} {path} is a folder without checkpoints '
                      f'(expected {os.path.join(path, checkpoint.CHECKPOINTS)}/<step>).')
    variables, meta = restore_raw_variables(path)
    saved = meta.get('fingerprint', {})
    if saved.get('student.name', name) != name:
      raise UserError(f'{what} {path} holds a {saved["student.name"]!r} model, not {name!r}.')
  elif str(path).endswith('.msgpack'):
    variables = read_msgpack_variables(path, name, what)
  else:
    from afd_jax.interop import torch as torch_interop  # pylint: disable=g-import-not-at-top
    try:
      variables = torch_interop.load(name, path)
    except (ValueError, ImportError, RuntimeError, OSError) as e:
      raise UserError(f'{what} {path}: {e}') from e
  init = lambda k: model.init(k, jax.numpy.zeros((2,) + tuple(image_shape)), train=False)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))  # shapes only: nothing is computed
  head = np.shape(variables.get('params', {}).get('fc', {}).get('kernel', ()))
  if len(head) == 2 and head[1] != num_classes:
    if not new_head_ok:
      raise UserError(f'{what} {path} has {head[1]} classes, the dataset has {num_classes}.')
    fresh_head = jax.jit(init)(jax.random.PRNGKey(0))['params']['fc']
    variables = {**variables, 'params': {**variables['params'], 'fc': fresh_head}}
  check_shapes(variables, abstract, f'{what} {path} ({name}, {num_classes} classes)')
  return jax.tree.map(lambda x, a: np.asarray(x, a.dtype), variables, abstract)


def check_shapes(variables, abstract, what: str) -> None:
  """UserError naming every missing, unexpected or wrongly shaped variable."""
  got = {jax.tree_util.keystr(p): np.shape(x)
         for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  problems = [f'missing {k}' for k in sorted(set(want) - set(got))]
  problems += [f'unexpected {k}' for k in sorted(set(got) - set(want))]
  problems += [f'{k}: {got[k]} vs expected {want[k]}' for k in sorted(set(got) & set(want))
               if tuple(got[k]) != want[k]]
  if problems:
    shown = '; '.join(problems[:8]) + (f'; ... ({len(problems)} in all)' if len(problems) > 8 else '')
    raise UserError(f'{what} does not fit the model: {shown}')

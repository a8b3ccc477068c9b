"""Model variables from files: our run's workdir (its latest readable checkpoint), an exported
`.msgpack`, or a PyTorch .pth; for teachers and student initialisation, each checked against the
model's shapes before training starts. Also writes the `.msgpack` files (python -m afd_jax.export).
"""
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
from etils import epath
from flax import serialization

from afd_jax import checkpoint, models
from afd_jax import task as task_lib
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
  `.msgpack` or a PyTorch .pth; with `config.teachers` (`model` a `models.Ensemble`) every
  teacher's from its own checkpoint, under its label.

  Validates the model names, class counts and every shape before training starts.
  """
  if models.is_ensemble(model):
    return _load_teachers(config, model, num_classes, image_shape)
  return _read_teacher(config, config.teacher, model, image_shape, 'teacher checkpoint',
                       'config.teacher.checkpoint', config.seed + 1, num_classes)


def _read_teacher(config, section, model, image_shape, what: str, key: str, seed: int,
                  num_classes: Optional[int] = None) -> Dict[str, Any]:
  """`section.checkpoint` (the config's `key`) read for `model`, fitted to `num_classes` (None:
  as read); 'random' (tests and benchmarks only) initialises an untrained teacher from `seed`."""
  path = section.checkpoint
  if path == 'random':
    warn(f'{key.replace("config.", "")}=random: distilling from an untrained teacher.')
    images = jax.numpy.zeros((2,) + tuple(image_shape))
    return jax.jit(lambda k: model.init(k, images, train=False))(jax.random.PRNGKey(seed))
  if not path:
    raise UserError(f'method {config.method!r} needs a teacher: set {key} to a workdir of a '
                    'teacher run or a PyTorch .pth file.')
  variables = read_model_variables(path, section.name, what)
  if num_classes is None:
    return variables
  return fit_model_variables(variables, path, section.name, model, num_classes, image_shape,
                             what)


def _load_teachers(config, ensemble, num_classes: int, image_shape) -> Dict[str, Any]:
  """Every teacher's variables under its label (`{'params': {label: ...}, ...}`); refuses
  teachers whose classifiers differ in class count before checking each against the data."""
  sections = task_lib.teacher_sections(config)
  read, counts = [], []
  for k, ((label, section), member) in enumerate(zip(sections, ensemble.members)):
    what = f'teacher {label} checkpoint'
    variables = _read_teacher(config, section, member, image_shape, what,
                              f'config.teachers[{k}].checkpoint', config.seed + 1 + k)
    read.append((label, section, member, what, variables))
    counts.append(_class_count(variables, member, image_shape))
  known = [(label, n) for (label, *_), n in zip(read, counts) if n is not None]
  if len({n for _, n in known}) > 1:
    listed = ', '.join(f'{label} {n}' for label, n in known)
    raise UserError(f'the teachers differ in class count ({listed}); several teachers need '
                    f'one label space, the dataset\'s {num_classes} classes.')
  out: Dict[str, Dict[str, Any]] = {}
  for label, section, member, what, variables in read:
    if section.checkpoint != 'random':
      variables = fit_model_variables(variables, section.checkpoint, section.name, member,
                                      num_classes, image_shape, what)
    for col, tree in variables.items():
      out.setdefault(col, {})[label] = tree
  return out


def _class_count(variables, model, image_shape) -> Optional[int]:
  """The output count of the classifier kernel in `variables` (found on `model`), or None
  where it cannot be told."""
  try:
    abstract = jax.eval_shape(lambda k: model.init(
        k, jax.numpy.zeros((2,) + tuple(image_shape)), train=False), jax.random.PRNGKey(0))
    node = variables['params']
    for key in models.classifier_path(model, abstract, image_shape):
      node = node[key]
    shape = np.shape(node['kernel'])
  except (KeyError, TypeError, ValueError):
    return None
  return int(shape[-1]) if len(shape) == 2 else None


def read_model_variables(path: str, name: str, what: str) -> Dict[str, Any]:
  """Variables of model `name` as stored in our workdir, a `.msgpack` or a .pth (unchecked)."""
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
    return variables
  if str(path).endswith('.msgpack'):
    return read_msgpack_variables(path, name, what)
  from afd_jax.interop import torch as torch_interop  # pylint: disable=g-import-not-at-top
  try:
    return torch_interop.load(name, path)
  except (ValueError, ImportError, RuntimeError, OSError) as e:
    raise UserError(f'{what} {path}: {e}') from e


def load_model_variables(path: str, name: str, model, num_classes: int, image_shape, what: str,
                         new_head_ok: bool = False) -> Dict[str, Any]:
  """Variables of model `name` from our workdir, a `.msgpack` or a .pth, checked against
  `model`'s shapes (`read_model_variables`, then `fit_model_variables`)."""
  return fit_model_variables(read_model_variables(path, name, what), path, name, model,
                             num_classes, image_shape, what, new_head_ok)


def fit_model_variables(variables, path: str, name: str, model, num_classes: int, image_shape,
                        what: str, new_head_ok: bool = False) -> Dict[str, Any]:
  """`variables` checked against `model`'s shapes, as numpy arrays of its dtypes.

  With `new_head_ok`, a classifier (`fc`) of another class count is replaced by a fresh one
  (transfer learning); otherwise it is an error.
  """
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

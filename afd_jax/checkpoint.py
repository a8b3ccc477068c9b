"""Orbax checkpoints: periodic async saves, restore-or-init, and teachers from checkpoints.

Resume order: this workdir's latest complete checkpoint -> `config.resume_from` (another
workdir's latest) -> a fresh init. A checkpoint that cannot be read is skipped with a warning
in favour of the previous one; nothing is ever deleted except by the keep-N policy (the last
`keep_checkpoints`, plus the best by eval top-1 when `keep_best`).
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

from afd_jax.distill import registry
from afd_jax.errors import UserError, warn

CHECKPOINTS = 'checkpoints'
# Settings a checkpoint must agree with to be resumed (dotted config paths, plus num_classes);
# the running method's own section (`config.<method>.*`, e.g. afd.qk_dim) and, for a method
# with a stage of its own, `config.pretrain.*` are added to these.
FINGERPRINT = ('dataset.name', 'num_classes', 'student.name', 'teacher.name', 'method',
               'batch_size')


def fingerprint(config, num_classes: int, distil: bool) -> Dict[str, Any]:
  out = {'num_classes': num_classes}
  for key in FINGERPRINT:
    if key == 'num_classes' or (key == 'teacher.name' and not distil):
      continue
    value = config
    for part in key.split('.'):
      value = value[part]
    out[key] = value
  own = config.get(config.method) if hasattr(config, 'get') else None
  for key, value in (own.items() if own is not None and hasattr(own, 'items') else ()):
    # A method's own settings matter only when it runs; as JSON keeps them (tuples: lists).
    out[f'{config.method}.{key}'] = list(value) if isinstance(value, tuple) else value
  if config.method in registry.names()[1:] and registry.get(config.method).pretrain is not None:
    for key, value in config.pretrain.items():  # where the stage ends and how it trains
      out[f'pretrain.{key}'] = value
  return out


def checkpoint_dir(workdir: str) -> epath.Path:
  """`workdir/checkpoints`, absolute (Orbax refuses relative paths); `gs://...` kept as is."""
  return epath.Path(workdir if '://' in str(workdir) else os.path.abspath(workdir)) / CHECKPOINTS


def state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's standard handler for the `state` item, with replica-parallel saving (each replica of
  a replicated array writes a slice of it) only where several processes share the writing. In one
  process every replica is local: slicing writes the same bytes and costs a slice program per
  array, compiled at the first save (about 10 s for a resnet8 pair on a CPU). (Orbax's default
  jax.Array handler also has an array-metadata store, which only re-wraps typed PRNG keys; the
  train state's key is a raw uint32 one.)"""
  arrays = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=None if jax.process_count() > 1 else False)  # None: Orbax's default
  scalars = ocp.type_handlers.ScalarHandler()
  return ocp.PyTreeCheckpointHandler(type_handler_registry=(
      ocp.type_handlers.create_type_handler_registry(
          (int, scalars), (float, scalars), (bytes, scalars), (np.number, scalars),
          (np.ndarray, ocp.type_handlers.NumpyHandler()), (jax.Array, arrays),
          (str, ocp.type_handlers.StringHandler()))))


def restore_args(target) -> ocp.args.PyTreeRestore:
  """Restores the `state` item onto `target`'s shapes, dtypes and shardings."""
  return ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


class Checkpoints:
  """An Orbax CheckpointManager under `workdir/checkpoints` holding `state` and `meta` items."""

  def __init__(self, workdir: str, keep: int = 3, keep_best: bool = True,
               async_save: bool = True, create: bool = True):
    self.directory = checkpoint_dir(workdir)
    policies = [ocp.checkpoint_managers.LatestN(max(keep, 1))]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m['top1'], n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=create, read_only=not create)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': state_handler(), 'meta': ocp.JsonCheckpointHandler()})

  def steps(self):
    return sorted(self.manager.all_steps())

  def read_meta(self, step: int) -> Dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def save(self, step: int, state, meta: Dict[str, Any],
           metrics: Optional[Dict[str, float]] = None) -> bool:
    """Saves asynchronously; a step that already exists (unreadable, skipped earlier) is kept."""
    if step in self.manager.all_steps():
      warn(f'not saving step {step}: {self.directory / str(step)} already exists.')
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def restore_latest(self, abstract_state) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """(state, meta) of the newest readable checkpoint, or None if there is none."""
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=restore_args(abstract_state), meta=ocp.args.JsonRestore()))
        return restored['state'], restored['meta']
      except Exception as e:  # pylint: disable=broad-except
        warn(f'checkpoint {self.directory / str(step)} cannot be read and is skipped '
              f'({type(e).__name__}: {str(e).splitlines()[0][:200]}).')
    return None

  def latest_meta(self) -> Optional[Dict[str, Any]]:
    """The meta item of the newest checkpoint whose meta can be read."""
    for step in reversed(self.steps()):
      try:
        return self.read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_compatible(meta: Optional[Dict[str, Any]], expected: Dict[str, Any], where: str) -> None:
  """Refuses to resume from a checkpoint written under other key settings."""
  if not meta:
    return
  saved = meta.get('fingerprint', {})
  diffs = [f'{k}: checkpoint has {saved[k]!r}, config has {v!r}'
           for k, v in expected.items() if k in saved and saved[k] != v]
  if diffs:
    raise UserError(f'{where} holds checkpoints of an incompatible run ({"; ".join(diffs)}). '
                    'Use another --workdir, or restore the original settings.')


def has_checkpoints(workdir: str) -> bool:
  path = checkpoint_dir(workdir)
  return path.exists() and any(p.name.isdigit() for p in path.iterdir())


def restore_raw_variables(workdir: str, collection_key: str = 'student') -> Tuple[Dict, Dict]:
  """Model variables and meta of another run's latest readable checkpoint, as numpy arrays."""
  ckpt = Checkpoints(workdir, create=False, async_save=False)
  for step in reversed(ckpt.steps()):
    try:
      meta = ckpt.read_meta(step)
      # Restore onto one local device whatever the topology it was saved from.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            ckpt.manager.item_metadata(step)['state'])
      state = ckpt.manager.restore(step, args=ocp.args.Composite(
          state=restore_args(target)))['state']
      state = jax.device_get(state)
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
    if not has_checkpoints(path):
      raise UserError(f'{what} {path} is a folder without checkpoints '
                      f'(expected {os.path.join(path, CHECKPOINTS)}/<step>).')
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


def write_json(path, payload) -> None:
  """Writes JSON via a temporary file and a rename (process 0 only; local or GCS paths)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(path)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
  tmp.replace(path)

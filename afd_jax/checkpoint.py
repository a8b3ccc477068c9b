"""Orbax checkpoints of the train state: periodic async saves, restore-or-init, resume checks.

Resume order: this workdir's latest complete checkpoint -> `config.resume_from` (another
workdir's latest) -> a fresh init. A checkpoint that cannot be read is skipped with a warning
in favour of the previous one; in the run's own workdir (one process), once an older one has
been read, it is moved to `workdir/unreadable_checkpoints/<step>-<UTC time>`, so that the run
can save that step again.
Nothing is ever deleted except by the keep-N policy (the last `keep_checkpoints`, plus the best
by eval top-1 when `keep_best`) and, when the disk fills up during a save, that save's own
unfinished folder (the run then stops with one line: `errors.DiskFull`).

Orbax's own log lines stay off the console unless asked for (`errors.verbose`).
"""
import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from afd_jax import dense_metrics
from afd_jax.distill import registry
from afd_jax.errors import DiskFull, UserError, verbose, warn
from afd_jax.state import TrainState

CHECKPOINTS = 'checkpoints'
UNREADABLE = 'unreadable_checkpoints'  # where the run's own unreadable checkpoints are moved
TMP_MARK = '.orbax-checkpoint-tmp'  # in the name of a folder Orbax has not finished writing
# Settings a checkpoint must agree with to be resumed (dotted config paths, plus num_classes);
# the running method's own section (`config.<method>.*`, e.g. afd.qk_dim) and, for a method
# with a stage of its own, `config.pretrain.*` are added to these.
FINGERPRINT = ('dataset.name', 'num_classes', 'student.name', 'teacher.name', 'method',
               'batch_size')


def best_metric(metrics: Dict[str, float]) -> float:
  """What ranks a checkpoint for `keep_best`: its eval mIoU (segmentation), else its top-1."""
  return metrics[dense_metrics.headline(metrics)]


def fingerprint(config, num_classes: int, distil: bool) -> Dict[str, Any]:
  # The state's own dtype (float64 mode's state is float64, every other run's float32).
  out = {'num_classes': num_classes,
         'state_dtype': 'float64' if getattr(config, 'dtype', '') == 'float64' else 'float32'}
  teachers = list(getattr(config, 'teachers', None) or ())
  if distil and teachers:  # several teachers: their labels and models, in order
    out['teachers'] = [f'{t.get("label") or t["name"]}={t["name"]}' for t in teachers]
  for key in FINGERPRINT:
    if key == 'num_classes' or (key == 'teacher.name' and (not distil or teachers)):
      continue
    value = config
    for part in key.split('.'):
      value = value[part]
    out[key] = value
  own = config.get(config.method) if hasattr(config, 'get') else None
  for key, value in (own.items() if own is not None and hasattr(own, 'items') else ()):
    # A method's own settings matter only when it runs; as JSON keeps them (tuples: lists).
    out[f'{config.method}.{key}'] = list(value) if isinstance(value, tuple) else value
  if config.method in registry.registered() and registry.get(config.method).pretrain is not None:
    for key, value in config.pretrain.items():  # where the stage ends and how it trains
      out[f'pretrain.{key}'] = value
  if getattr(config, 'ema_decay', 0.0) > 0:  # the state holds a moving average
    out['ema_decay'] = config.ema_decay
  head = getattr(config.student, 'head', '') if hasattr(config, 'student') else ''
  if head:  # a segmentation student: its head's parameters are in the state
    out['student.head'] = head
    out['student.head_width'] = getattr(config.student, 'head_width', 64)
  return out


# Fingerprint keys that older checkpoints lack, with the value they had (their runs' default).
FINGERPRINT_DEFAULTS = {'ema_decay': 0.0, 'teachers': None,  # None: one teacher, or none
                        'student.head': ''}  # '' = a classifier


def checkpoint_dir(workdir: str) -> epath.Path:
  """`workdir/checkpoints`, absolute (Orbax refuses relative paths); `gs://...` kept as is."""
  return epath.Path(workdir if '://' in str(workdir) else os.path.abspath(workdir)) / CHECKPOINTS


class _QuietOrbax(logging.Filter):
  """Drops Orbax's own absl log records (its notes on read-only managers, the tracebacks of a
  failed save, which the run reports in one line) unless the user asked for them."""

  def filter(self, record):
    return verbose() or f'{os.sep}orbax{os.sep}' not in record.pathname


logging.getLogger('absl').addFilter(_QuietOrbax())


class _QuietClosedLoops:
  """A `sys.unraisablehook` that drops `RuntimeError: Event loop is closed` (unless verbose) and
  passes everything else on. When one array of a restore or save fails, Orbax closes that
  operation's asyncio loop while TensorStore still completes the other arrays; each completion
  that finds the loop closed is reported as unraisable (a traceback each), after the failure
  itself was raised and reported."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed' and not verbose():
      return
    self.previous(unraisable)


def quiet_closed_event_loops() -> None:
  if not isinstance(sys.unraisablehook, _QuietClosedLoops):
    sys.unraisablehook = _QuietClosedLoops(sys.unraisablehook)


def is_disk_full(error: Optional[BaseException]) -> bool:
  """Is `error`, or an exception it was raised from, a full disk or quota (ENOSPC, EDQUOT, or
  the same words in TensorStore's RESOURCE_EXHAUSTED message)?"""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(error) or 'Disk quota exceeded' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def free_bytes(path) -> Optional[int]:
  """Free bytes on the file system holding local `path`; None for a remote or missing path."""
  if '://' in str(path):
    return None
  try:
    return shutil.disk_usage(str(path)).free
  except OSError:
    return None


def folder_bytes(path) -> int:
  """Total size of the files under local `path`."""
  total = 0
  for root, _, files in os.walk(str(path)):
    for name in files:
      with contextlib.suppress(OSError):
        total += os.path.getsize(os.path.join(root, name))
  return total


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


def map_distillers(fn, tree, *likes):
  """`tree` with `fn(subtree, *like_subtrees)` in place of every non-empty `'distiller'` entry:
  a TrainState's params and batch stats, and the optimizer states' trees that mirror params.
  `likes` are trees of the same structure outside those entries."""
  if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
    return type(tree)(**{f.name: map_distillers(fn, getattr(tree, f.name),
                                                *[getattr(l, f.name) for l in likes])
                         for f in dataclasses.fields(tree)})
  if isinstance(tree, Mapping):
    return {k: (fn(v, *[l[k] for l in likes]) if k == 'distiller' and isinstance(v, Mapping) and v
                else map_distillers(fn, v, *[l[k] for l in likes])) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):  # a NamedTuple (optax's states)
    return type(tree)(*[map_distillers(fn, v, *[l[i] for l in likes])
                        for i, v in enumerate(tree)])
  if isinstance(tree, (list, tuple)):
    return type(tree)(map_distillers(fn, v, *[l[i] for l in likes]) for i, v in enumerate(tree))
  return tree


def _older_distiller_layout(saved) -> Optional[registry.OlderLayout]:
  """The older layout of the distiller's parameters in a saved state's metadata tree, if any."""
  try:  # Orbax's tree metadata: indexable by name, though not a Mapping
    distiller = saved['params']['distiller']
  except (KeyError, TypeError):
    return None
  return registry.older_layout_of(list(distiller)) if isinstance(distiller, Mapping) else None


def _older_shapes(layout: registry.OlderLayout, collection):
  """The restore target of a distiller collection in `layout`: replicated on the collection's
  mesh (its arrays have other shapes than the collection's, which may be split)."""
  sharding = getattr(jax.tree.leaves(collection)[0], 'sharding', None)
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(layout.older, collection))


def _placed_like(tree, like):
  return jax.tree.map(lambda x, l: jax.device_put(x, l.sharding)
                      if getattr(l, 'sharding', None) is not None else x, tree, like)


def restore_args(target) -> ocp.args.PyTreeRestore:
  """Restores the `state` item onto `target`'s shapes, dtypes and shardings."""
  return ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


class Checkpoints:
  """An Orbax CheckpointManager under `workdir/checkpoints` holding `state` and `meta` items.
  With `create` it is the run's own: it saves, and moves its unreadable checkpoints aside;
  without, it only reads (another run's workdir, a teacher)."""

  def __init__(self, workdir: str, keep: int = 3, keep_best: bool = True,
               async_save: bool = True, create: bool = True):
    self.directory = checkpoint_dir(workdir)
    self.read_only = not create
    self._started = []  # the steps whose saves this object started
    self._tmp_before = self._unfinished_folders()  # left by earlier runs: never removed here
    quiet_closed_event_loops()
    policies = [ocp.checkpoint_managers.LatestN(max(keep, 1))]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_metric, n=1, keep_checkpoints_without_metrics=False))
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

  def read_state(self, step: int) -> Dict[str, Any]:
    """Step `step`'s state as saved (a dict of numpy arrays), whatever mesh it was saved from:
    read onto one local device, then fetched."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          self.manager.item_metadata(step)['state'])
    return jax.device_get(self.manager.restore(step, args=ocp.args.Composite(
        state=restore_args(target)))['state'])

  def save(self, step: int, state, meta: Dict[str, Any],
           metrics: Optional[Dict[str, float]] = None) -> bool:
    """Saves asynchronously; a step that already exists (one that could not be moved aside) is
    kept. Raises DiskFull when this save or the one before it ran out of space."""
    if step in self.manager.all_steps():
      warn(f'not saving step {step}: {self.directory / str(step)} already exists.')
      return False
    with self._space_checked():
      self._started.append(step)
      return self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                        meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)

  def restore_latest(self, abstract_state) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """(state, meta) of the newest readable checkpoint, or None if there is none. Each one that
    cannot be read gets one warning; in the run's own workdir, once an older one has been read
    (so the failure is the checkpoint's, not a store that is down or a state of another
    layout), the unreadable newer ones are moved aside. With several processes they stay (a
    failure on one host alone must not make the hosts disagree)."""
    unreadable = []
    for step in reversed(self.steps()):
      try:
        restored = self._restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        unreadable.append((step, _first_line(e)))
        continue
      movable = not self.read_only and jax.process_count() == 1
      for bad, reason in unreadable:
        note = self._set_aside(bad) if movable else ''
        warn(f'checkpoint {self.directory / str(bad)} cannot be read and is skipped '
             f'({reason}){note}.')
      return restored['state'], restored['meta']
    for bad, reason in unreadable:
      warn(f'checkpoint {self.directory / str(bad)} cannot be read and is skipped ({reason}).')
    return None

  def _restore(self, step: int, abstract_state) -> Dict[str, Any]:
    """{'state', 'meta'} of `step`. A state saved before TrainState had `ema` (a run without a
    moving average; its saved tree has no 'ema') is read into the fields it has; a distiller
    saved in a method's older layout (`registry.OlderLayout`) is read in it and converted."""
    saved = self.manager.item_metadata(step)['state']
    target = abstract_state
    legacy = (isinstance(abstract_state, TrainState) and not abstract_state.ema
              and 'ema' not in saved)
    if legacy:
      target = {k: getattr(abstract_state, k)
                for k in ('step', 'params', 'batch_stats', 'opt_state', 'rng')}
    layout, current = _older_distiller_layout(saved), target
    if layout is not None:
      target = map_distillers(lambda c: _older_shapes(layout, c), target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=restore_args(target), meta=ocp.args.JsonRestore()))
    if layout is not None:
      restored = {**restored, 'state': map_distillers(
          lambda older, like: _placed_like(layout.current(older, like), like),
          restored['state'], current)}
    return {**restored, 'state': TrainState(**restored['state'])} if legacy else restored

  def _set_aside(self, step: int) -> str:
    """Moves step `step`'s folder to `workdir/unreadable_checkpoints/<step>-<UTC time>` and
    forgets it, so that this run can save that step again (one process only). Returns the
    warning's note on where it went, or why it stayed."""
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    target = self.directory.parent / UNREADABLE / f'{step}-{stamp}'
    note = f'; moved to {target}'
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    except Exception as e:  # pylint: disable=broad-except  (OSError, or a remote store's own)
      reason = getattr(e, 'strerror', None) or type(e).__name__
      note = f'; it could not be moved aside ({reason}), so it stays'
    self.manager.reload()
    return note

  def _unfinished_folders(self) -> set:
    """Names of the folders under `checkpoints/` that Orbax has not finished writing."""
    if not self.directory.exists():
      return set()
    return {p.name for p in self.directory.iterdir() if TMP_MARK in p.name}

  @contextlib.contextmanager
  def _space_checked(self):
    """A full disk in the block (a save, or a wait for one) becomes DiskFull."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if not is_disk_full(e):
        raise
      raise self._disk_full() from e

  def _disk_full(self) -> DiskFull:
    """Removes the unfinished folders of this object's failed saves (nothing written before it
    started) and says where space ran out, how much is left and what is still complete."""
    self.manager.reload()
    complete = self.steps()
    failed = [s for s in self._started if s not in complete]
    removed = []  # the failed saves' own folders (a save that never began has none)
    for name in sorted(self._unfinished_folders() - self._tmp_before):
      step_name = name.split(TMP_MARK)[0]
      if step_name.isdigit() and int(step_name) in failed and (
          jax.process_index() > 0 or _remove_folder(self.directory / name)):
        removed.append(int(step_name))
    free = free_bytes(self.directory)
    size = folder_bytes(self.directory / str(complete[-1])) if complete and free is not None else 0
    room = (f'{free:,} bytes free there' if free is not None else 'no space left there') + (
        f', a checkpoint takes about {size:,}' if size else '')
    what = f'step {max(removed or failed)}' if failed else 'a step'
    return DiskFull(
        f'no space left on device: the checkpoint of {what} could not be written to '
        f'{self.directory} ({room}); '
        + ('its unfinished folder was removed; ' if removed else '')
        + (f'the last complete checkpoint is step {complete[-1]}' if complete
           else 'no checkpoint is complete')
        + '. Free some space and rerun the same command to resume.')

  def latest_meta(self) -> Optional[Dict[str, Any]]:
    """The meta item of the newest checkpoint whose meta can be read."""
    for step in reversed(self.steps()):
      try:
        return self.read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue
    return None

  def wait(self) -> None:
    with self._space_checked():
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    except DiskFull:
      with contextlib.suppress(Exception):  # the one line, not Orbax's own error on top of it
        self.manager.close()
      raise
    self.manager.close()


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f'{type(error).__name__}: {text.splitlines()[0][:200]}' if text else type(error).__name__


def _remove_folder(path: epath.Path, tries: int = 3) -> bool:
  """rmtree, retried briefly: a failed save's last writes may still land in it."""
  for attempt in range(tries):
    try:
      path.rmtree()
      return True
    except OSError:
      time.sleep(0.1 * (attempt + 1))
  return False


def check_compatible(meta: Optional[Dict[str, Any]], expected: Dict[str, Any], where: str) -> None:
  """Refuses to resume from a checkpoint written under other key settings."""
  if not meta:
    return
  saved = {**FINGERPRINT_DEFAULTS, **meta.get('fingerprint', {})}
  expected = {**FINGERPRINT_DEFAULTS, **expected}
  diffs = [f'{k}: checkpoint has {saved[k]!r}, config has {v!r}'
           for k, v in expected.items() if k in saved and saved[k] != v]
  if diffs:
    raise UserError(f'{where} holds checkpoints of an incompatible run ({"; ".join(diffs)}). '
                    'Use another --workdir, or restore the original settings.')


def has_checkpoints(workdir: str) -> bool:
  path = checkpoint_dir(workdir)
  return path.exists() and any(p.name.isdigit() for p in path.iterdir())


def _json_value(value):
  """What JSON cannot hold as is: a config section inside a list (`config.teachers`: a
  ConfigDict's `to_dict` leaves those) as a dict, a NumPy or JAX scalar as a float."""
  return value.to_dict() if hasattr(value, 'to_dict') else float(value)


def write_json(path, payload) -> None:
  """Writes JSON via a temporary file and a rename (process 0 only; local or GCS paths)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(path)
  tmp = path.with_name(path.name + '.tmp')
  try:
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_value))
    tmp.replace(path)
  except OSError as e:
    if not is_disk_full(e):
      raise
    with contextlib.suppress(OSError):
      tmp.unlink()
    free = free_bytes(path.parent)
    raise DiskFull(f'no space left on device: {path} could not be written'
                   + (f' ({free:,} bytes free there)' if free is not None else '')
                   + '. Free some space and rerun the same command.') from e

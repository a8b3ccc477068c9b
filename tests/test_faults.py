"""Faults a cluster brings, on a tiny AFD run that checkpoints every step, each ending in one
line and losing nothing:

- every data file of the newest checkpoint damaged: one warning, no traceback; the folder is
  moved to `unreadable_checkpoints/` (its files untouched), the rerun saves the recomputed step,
  ends with the uninterrupted run's state and its newest checkpoint holds that state;
- the disk fills up during a save (the workdir on a small tmpfs): one `error:` line naming the
  path and the bytes left, a non-zero exit, the earlier checkpoints intact and only Orbax's
  unfinished folder of that save removed; once there is room the rerun resumes exactly;
- a truncated PNG in an `image_folder` dataset: exactly one line on stderr, none of TensorFlow's
  C++ log (a subprocess, where that log would be seen);
- Orbax's own log lines and its closed-event-loop noise reach the console only when asked for.
"""
import logging
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import orbax.checkpoint as ocp
import pytest

from afd_jax import checkpoint, train
from afd_jax.errors import VERBOSE_ENV
from tests import runs

STEPS = 3  # 96 examples in batches of 32: one epoch of 3 steps, a checkpoint after each step
ARGS = dict(num_train_steps=STEPS, checkpoint_every_steps=1, dataset__train_subset=32 * STEPS)


def run_cli(data_dir, workdir):
  return runs.cli_in_process(runs.flag_args(data_dir, **ARGS), str(workdir))


@pytest.fixture(scope='module')
def reference(digits_data_dir, tmp_path_factory):
  """An uninterrupted run: its workdir and summary."""
  workdir = tmp_path_factory.mktemp('reference')
  result = run_cli(digits_data_dir, workdir)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert checkpoint.Checkpoints(str(workdir), create=False).steps() == [1, 2, 3]
  return workdir, runs.summary(workdir)


@pytest.fixture
def quiet_console(monkeypatch, caplog):
  """What would reach the console besides stdout/stderr: Orbax's absl records (caplog) and
  unraisable exceptions (recorded here). Returns the list the unraisable ones go to."""
  monkeypatch.delenv(VERBOSE_ENV, raising=False)
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  caplog.set_level(logging.WARNING)
  return unraisable


def orbax_records(caplog):
  return [r.getMessage() for r in caplog.records if f'{os.sep}orbax{os.sep}' in r.pathname]


def saved_state_sha256(workdir, step) -> str:
  """SHA-256 of the whole train state saved at `step` (restored onto one device)."""
  ckpts = checkpoint.Checkpoints(str(workdir), create=False)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ckpts.manager.item_metadata(step)['state'])
  state = ckpts.manager.restore(step, args=ocp.args.Composite(
      state=checkpoint.restore_args(target)))['state']
  ckpts.close()
  return train.params_sha256(state)


def assert_ends_like(reference, workdir, result, resumed_at):
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert f'resumed from {workdir} (own checkpoint) at step {resumed_at}' in result.stdout
  summary = runs.summary(workdir)
  assert summary['final_step'] == STEPS
  assert summary['state_sha256'] == reference[1]['state_sha256']
  assert summary['params_sha256'] == reference[1]['params_sha256']
  # The newest checkpoint holds the final state, as the uninterrupted run's does.
  assert checkpoint.Checkpoints(str(workdir), create=False).steps() == [1, 2, 3]
  assert saved_state_sha256(workdir, STEPS) == saved_state_sha256(reference[0], STEPS)


def test_damaged_newest_checkpoint_is_moved_aside_and_the_rerun_saves_the_final_state(
    digits_data_dir, reference, tmp_path, quiet_console, caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  os.remove(workdir / 'summary.json')  # as if the run had been stopped after its last save
  newest = workdir / 'checkpoints' / str(STEPS)
  data_files = [p for p in (newest / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  assert data_files
  for path in data_files:
    path.write_bytes(b'\0garbage' * max(1, path.stat().st_size // 8))
  damaged = runs.tree_digest(newest)

  result = run_cli(digits_data_dir, workdir)

  warnings = [line for line in result.stdout.splitlines() if 'cannot be read' in line]
  assert len(warnings) == 1, result.stdout
  moved = list((workdir / checkpoint.UNREADABLE).iterdir())
  assert [p.name.split('-')[0] for p in moved] == [str(STEPS)]
  assert warnings[0].startswith(f'WARNING: checkpoint {newest} cannot be read and is skipped (')
  assert warnings[0].endswith(f'; moved to {moved[0]}.')
  assert runs.tree_digest(moved[0]) == damaged  # moved, not altered
  assert 'not saving step' not in result.stdout
  assert 'Traceback' not in result.stdout + result.stderr and not result.stderr.strip()
  assert not orbax_records(caplog) and not quiet_console
  assert_ends_like(reference, workdir, result, resumed_at=STEPS - 1)


def allocated_bytes(folder, skip=()) -> int:
  """What the files under `folder` take on a file system of 4 KiB pages (tmpfs)."""
  total = 0
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      if not any(path.startswith(str(s)) for s in skip):
        total += -(-os.path.getsize(path) // 4096) * 4096
  return total


def mount_tmpfs(path, size: int) -> None:
  path.mkdir()
  try:
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, text=True, timeout=30, check=False)
  except OSError as e:
    pytest.skip(f'no mount command ({e}): the full-disk case needs a small tmpfs')
  if done.returncode:
    pytest.skip('cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): '
                f'{done.stderr.strip()}')


def test_full_disk_during_a_save_is_one_line_and_the_rerun_resumes_exactly(
    digits_data_dir, reference, tmp_path, quiet_console, caplog):
  ref_dir = reference[0]
  newest = ref_dir / 'checkpoints' / str(STEPS)
  # Room for everything the run writes before its last save, and half of that save.
  size = (allocated_bytes(ref_dir, skip=(newest, ref_dir / 'summary.json'))
          + allocated_bytes(newest) // 2)
  disk = tmp_path / 'disk'
  mount_tmpfs(disk, size)
  try:
    workdir = disk / 'run'
    result = run_cli(digits_data_dir, workdir)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    match = re.fullmatch(
        rf'error: no space left on device: the checkpoint of step {STEPS} could not be written '
        rf'to {re.escape(str(workdir / "checkpoints"))} \(([\d,]+) bytes free there, a '
        rf'checkpoint takes about [\d,]+\); its unfinished folder was removed; the last '
        rf'complete checkpoint is step {STEPS - 1}\. Free some space and rerun the same command '
        r'to resume\.', lines[0])
    assert match, lines[0]
    assert 0 < int(match.group(1).replace(',', '')) < allocated_bytes(newest)  # too little
    assert 'Traceback' not in result.stdout and not orbax_records(caplog) and not quiet_console
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']  # no unfinished folder
    assert not (workdir / 'summary.json').exists()
    for step in (1, STEPS - 1):  # the complete checkpoints are intact
      assert saved_state_sha256(workdir, step) == saved_state_sha256(ref_dir, step)

    subprocess.run(['mount', '-o', f'remount,size={4 * size}', str(disk)], check=True,
                   timeout=30)  # room again
    assert_ends_like(reference, workdir, run_cli(digits_data_dir, workdir),
                     resumed_at=STEPS - 1)
  finally:
    if subprocess.run(['umount', str(disk)], check=False, timeout=60).returncode:
      subprocess.run(['umount', '-l', str(disk)], check=False, timeout=60)


def test_a_full_disk_outside_a_save_is_one_line_too(digits_data_dir, tmp_path, monkeypatch):
  """A write that no checkpoint save guards (TensorBoard events, attention maps) runs out of
  space: the command line still ends in one line naming the file, exit code 2."""
  import errno  # pylint: disable=g-import-not-at-top

  def full(config, workdir):
    del config, workdir
    try:
      raise OSError(errno.ENOSPC, 'No space left on device', '/w/events.out.tfevents')
    except OSError as e:
      raise RuntimeError('the event writer failed') from e

  monkeypatch.setattr(train, 'train_and_evaluate', full)
  result = runs.cli_in_process(runs.flag_args(digits_data_dir), workdir=str(tmp_path / 'w'))
  assert result.returncode == 2
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith('error: no space left on device writing /w/events.out.tfevents')
  assert 'rerun the same command to resume' in line


def test_truncated_png_is_exactly_one_line_on_stderr(tmp_path):
  from afd_jax.data.tfimport import tf  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'folder'
  for split, count in (('train', 4), ('test', 2)):
    for label in ('a', 'b'):
      (root / split / label).mkdir(parents=True)
      for i in range(count):
        image = tf.cast(tf.random.stateless_uniform((12, 12, 3), (i, 0), 0, 255), tf.uint8)
        (root / split / label / f'{i}.png').write_bytes(tf.io.encode_png(image).numpy())
  broken = root / 'train' / 'a' / '1.png'
  broken.write_bytes(broken.read_bytes()[:60])
  args = [f'--config={runs.REPO}/configs/digits.py:student', '--config.dataset.name=image_folder',
          f'--config.dataset.folder={root}', '--config.dataset.augment=imagenet',
          '--config.dataset.image_size=8', '--config.dataset.mean=(0.5,0.5,0.5)',
          '--config.dataset.std=(0.25,0.25,0.25)', '--config.batch_size=8',
          '--config.eval_batch_size=4', '--config.num_train_steps=2',
          '--config.student.name=resnet8', f'--workdir={tmp_path / "w"}']
  env = runs.env(devices=1)
  for name in ('TF_CPP_MIN_LOG_LEVEL', VERBOSE_ENV):  # as a user's shell has them: unset
    env.pop(name, None)
  result = subprocess.run([sys.executable, '-m', 'afd_jax.main', *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=runs.REPO)
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert result.stderr.splitlines() == [
      f'error: image_folder {root}: cannot decode {broken}: Invalid PNG data, size 60'], \
      result.stderr


def test_library_log_lines_only_when_asked_for(reference, monkeypatch, caplog, quiet_console):
  """A read-only manager (every resume opens one) makes Orbax log two notes; they reach the
  log only with AFD_VERBOSE=1. The closed-event-loop noise is dropped, other unraisable errors
  pass on, and with AFD_VERBOSE=1 it passes on too."""
  checkpoint.Checkpoints(str(reference[0]), create=False)
  assert not orbax_records(caplog)
  hook = sys.unraisablehook
  assert isinstance(hook, checkpoint._QuietClosedLoops)  # pylint: disable=protected-access
  noise, other = RuntimeError('Event loop is closed'), RuntimeError('something else')
  for error in (noise, other):
    hook(types.SimpleNamespace(exc_value=error))
  assert [u.exc_value for u in quiet_console] == [other]

  monkeypatch.setenv(VERBOSE_ENV, '1')
  checkpoint.Checkpoints(str(reference[0]), create=False)
  assert any('read only' in m or 'read_only' in m for m in orbax_records(caplog))
  hook(types.SimpleNamespace(exc_value=noise))
  assert [u.exc_value for u in quiet_console] == [other, noise]

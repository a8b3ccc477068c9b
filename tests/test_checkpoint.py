"""Checkpointing and fault tolerance: round trip, exact resume after SIGKILL/SIGTERM and a killed
async save, the divergence guard, teachers from checkpoints, and bad input losing nothing."""
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import checkpoint, models, train
from afd_jax.errors import UserError
from afd_jax.interop import torch as torch_interop
from tests import runs
from tests.test_step import mesh_of, setup, tiny_task

STEPS = 30  # every run below: 30 steps of 32 examples, a checkpoint every 5 steps and at the end
PREVIOUS = STEPS - 5
DEVICES = 1  # the CLI runs use one device: exactness holds for a fixed device count


def run_args(data_dir, **overrides):
  return runs.flag_args(data_dir, num_train_steps=STEPS, **overrides)


def run_until_step(args, workdir, stop_at, sig):
  """Starts the CLI and sends `sig` once it reports step `stop_at`."""
  cmd = [sys.executable, '-m', 'afd_jax.main', *args, f'--workdir={workdir}']
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=runs.env(DEVICES), cwd=runs.REPO)
  output = []
  for line in proc.stdout:
    output.append(line)
    match = re.match(r'step (\d+)/', line)
    if match and int(match.group(1)) >= stop_at:
      proc.send_signal(sig)
      break
  output += proc.stdout.readlines()
  return proc.wait(timeout=300), ''.join(output)


@pytest.fixture(scope='module')
def reference(digits_data_dir, tmp_path_factory):
  """An uninterrupted run: its workdir and summary."""
  workdir = tmp_path_factory.mktemp('reference')
  runs.cli(run_args(digits_data_dir), workdir=str(workdir), check=True, devices=DEVICES)
  return workdir, runs.summary(workdir)


@pytest.mark.parametrize('relative', [False, True], ids=['absolute', 'relative_workdir'])
def test_round_trip_of_the_full_state_on_8_devices(tmp_path, monkeypatch, relative):
  task, mesh = tiny_task(), mesh_of(8)
  state, _ = setup(task, mesh)
  monkeypatch.chdir(tmp_path)
  ckpts = checkpoint.Checkpoints('workdirs/run' if relative else str(tmp_path), keep=2)
  ckpts.save(3, state, {'step': 3})
  ckpts.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, meta = ckpts.restore_latest(abstract)
  ckpts.close()
  assert meta == {'step': 3}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding and len(a.sharding.device_set) == 8


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM], ids=['sigkill', 'sigterm'])
def test_interrupted_and_resumed_run_ends_identical(digits_data_dir, reference, tmp_path, sig):
  workdir = tmp_path / 'run'
  stop_at = random.Random(sig).randint(3, STEPS - 2)
  code, output = run_until_step(run_args(digits_data_dir), workdir, stop_at, sig)
  if sig == signal.SIGTERM:
    assert code == 143, output[-2000:]  # saved, then stopped; rerun to resume
    assert 'preemption notice' in output
  else:
    assert code == -signal.SIGKILL  # possibly in the middle of an asynchronous save
  assert not (workdir / 'summary.json').exists()
  saved = checkpoint.has_checkpoints(str(workdir))
  assert saved or sig == signal.SIGKILL
  resumed = runs.cli(run_args(digits_data_dir), workdir=str(workdir), check=True,
                     devices=DEVICES)
  assert ('resumed from' in resumed.stdout) == saved
  assert runs.summary(workdir)['params_sha256'] == reference[1]['params_sha256']


def test_a_save_killed_mid_write_is_ignored(digits_data_dir, reference, tmp_path):
  """What a kill during an asynchronous save leaves (an unfinished tmp folder) is skipped."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0] / 'checkpoints', workdir / 'checkpoints')
  final = workdir / 'checkpoints' / str(STEPS)
  partial = workdir / 'checkpoints' / f'{STEPS}.orbax-checkpoint-tmp-1700000000'
  final.rename(partial)
  for f in list((partial / 'state').rglob('*'))[::2]:
    if f.is_file():
      f.unlink()
  result = runs.cli(run_args(digits_data_dir), workdir=str(workdir), check=True, devices=DEVICES)
  assert 'resumed from' in result.stdout and f'at step {PREVIOUS}' in result.stdout
  assert runs.summary(workdir)['params_sha256'] == reference[1]['params_sha256']
  assert partial.exists()  # nothing of the user's is deleted


def test_non_finite_loss_stops_before_any_checkpoint_of_it(digits_data_dir, tmp_path):
  config = runs.tiny_config(digits_data_dir, num_train_steps=STEPS, debug_nan_at_step=7)
  with pytest.raises(train.TrainingDiverged) as info:  # the CLI prints it and exits with 2
    train.train_and_evaluate(config, str(tmp_path))
  assert "non-finite loss term 'ce' at step 7" in str(info.value)
  assert 'the last good checkpoint is step 5' in str(info.value)
  ckpts = checkpoint.Checkpoints(str(tmp_path), create=False)
  assert ckpts.steps() == [5]
  variables, meta = checkpoint.restore_raw_variables(str(tmp_path))
  assert meta['step'] == 5
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


@pytest.fixture(scope='module')
def teacher_run(digits_data_dir, tmp_path_factory):
  """A resnet8 trained alone for a few steps: a teacher workdir of our own."""
  workdir = tmp_path_factory.mktemp('teacher')
  train.train_and_evaluate(runs.tiny_config(digits_data_dir, run='student', num_train_steps=6),
                           str(workdir))
  return workdir


def teacher_config(data_dir, path, name='resnet8'):
  return runs.tiny_config(data_dir, teacher__checkpoint=str(path), teacher__name=name)


def test_teacher_from_pth_and_from_our_workdir_give_the_same_logits(digits_data_dir, teacher_run,
                                                                   tmp_path):
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  model = models.create('resnet8', 10)
  from_orbax = checkpoint.load_teacher(teacher_config(digits_data_dir, teacher_run), model, 10,
                                       (8, 8, 1))
  state_dict = {k: torch.from_numpy(np.array(v))
                for k, v in torch_interop.to_state_dict('resnet8', from_orbax).items()}
  torch.save({'model': state_dict}, tmp_path / 'teacher.pth')
  from_pth = checkpoint.load_teacher(teacher_config(digits_data_dir, tmp_path / 'teacher.pth'),
                                     model, 10, (8, 8, 1))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  a, _ = model.apply(from_orbax, images, train=False)
  b, _ = model.apply(from_pth, images, train=False)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.std(a)) > 0


def bad_pth(tmp_path, name, num_classes, channels=1):
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  model = models.create(name, num_classes)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, channels)), train=False))(
      jax.random.PRNGKey(0))
  path = tmp_path / f'{name}_{num_classes}.pth'
  torch.save({k: torch.from_numpy(np.array(v))
              for k, v in torch_interop.to_state_dict(name, variables).items()}, path)
  return path


@pytest.fixture
def finished_run(reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  return workdir


@pytest.mark.parametrize('case', ['changed_config', 'wrong_teacher_shapes', 'wrong_class_count',
                                  'corrupt_latest'])
def test_bad_input_leaves_checkpoints_byte_identical(digits_data_dir, finished_run, tmp_path, case,
                                                     capsys):
  config = runs.tiny_config(digits_data_dir, num_train_steps=STEPS)
  if case == 'changed_config':
    config.student.name = 'resnet14'
    expected = "student.name: checkpoint has 'resnet8', config has 'resnet14'"
  elif case == 'wrong_teacher_shapes':
    config.teacher.checkpoint = str(bad_pth(tmp_path, 'resnet14', 10))
    expected = 'unexpected entries: layer1.1.bn1.bias'
  elif case == 'wrong_class_count':
    config.teacher.checkpoint = str(bad_pth(tmp_path, 'resnet8', 7))
    expected = 'has 7 classes, the dataset has 10'
  else:
    os.remove(finished_run / 'summary.json')
    data_files = sorted((p for p in (finished_run / 'checkpoints' / str(STEPS) / 'state').rglob('*')
                         if p.is_file()), key=lambda p: p.stat().st_size)
    data_files[-1].write_bytes(b'\0garbage' * 64)
    expected = f'checkpoint {finished_run / "checkpoints" / str(STEPS)} cannot be read and is skipped'
  before = runs.tree_digest(finished_run / 'checkpoints')
  if case == 'corrupt_latest':  # a warning: it resumes from the previous one and finishes
    train.train_and_evaluate(config, str(finished_run))
    output = capsys.readouterr().out
    assert expected in output and f'resumed from {finished_run} (own checkpoint) at step {PREVIOUS}' in output
  else:  # (the CLI prints the message as one line and exits with 2: tests/test_train.py)
    with pytest.raises(UserError, match=re.escape(expected)):
      train.train_and_evaluate(config, str(finished_run))
  assert runs.tree_digest(finished_run / 'checkpoints') == before

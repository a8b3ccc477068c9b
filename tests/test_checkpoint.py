"""Checkpointing and fault tolerance: round trip; one run per workdir, then exact resume after
SIGKILL of its holder; SIGTERM and a save killed mid-write; the divergence guard; teachers from
checkpoints; bad input losing nothing; a student initialised from a checkpoint of another class
count; keeping the latest and the best; a model from a test file trained with 'auto' taps."""
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from afd_jax import checkpoint, models, sharding, step, train, weights, workdir_lock
from afd_jax.distill import afd
from afd_jax import task as task_lib
from afd_jax.errors import UserError
from afd_jax.interop import torch as torch_interop
from tests import runs
from tests.test_step import mesh_of, setup, tiny_task, toy_batch

STEPS = 30  # every run below: 30 steps of 32 examples, a checkpoint every 5 steps and at the end
STEPS_PER_EPOCH = 10  # a 320-example training subset: epochs end (evaluate, save) at 10, 20, 30
PREVIOUS = STEPS - 5
DEVICES = 1  # the CLI runs use one device: exactness holds for a fixed device count


# The student of these CLI runs is a model defined in a test file, not in afd_jax, with its taps
# found by 'auto' (bring-your-own-model); the teacher is the zoo's resnet8.
BYO_STUDENT = {'student__name': 'tests.byo_models:tiny_convnet', 'student__taps': 'auto'}


def run_args(data_dir, **overrides):
  return runs.flag_args(data_dir, num_train_steps=STEPS,
                        dataset__train_subset=32 * STEPS_PER_EPOCH, **{**BYO_STUDENT, **overrides})


@pytest.mark.parametrize('relative', [False, True], ids=['absolute', 'relative_workdir'])
def test_round_trip_of_the_full_state_on_8_devices(tmp_path, monkeypatch, caplog, relative):
  task, mesh = tiny_task(), mesh_of(8)
  state, _ = setup(task, mesh)
  monkeypatch.chdir(tmp_path)
  ckpts = checkpoint.Checkpoints('workdirs/run' if relative else str(tmp_path), keep=2)
  with jax.log_compiles():  # one process: no replica-parallel slicing, so no slice programs
    with caplog.at_level(logging.WARNING):
      ckpts.save(3, state, {'step': 3})
      ckpts.wait()
  assert not [r for r in caplog.records if 'Compiling' in r.getMessage()]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, meta = ckpts.restore_latest(abstract)
  ckpts.close()
  assert meta == {'step': 3}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding and len(a.sharding.device_set) == 8


def test_a_state_with_one_linear_bn_per_afd_tap_restores_into_the_stacked_layout(tmp_path):
  """Checkpoints written before AFD stacked its taps hold `query_<n>` / `key_<m>` LinearBNs
  in the params, the batch stats and the optimizer's momentum: such a state (after one step, so
  the momentum is not zero) restores into today's layout, every value and sharding as saved."""
  task, mesh = tiny_task(), mesh_of(8)
  state, teacher_vars = setup(task, mesh)
  batch = sharding.global_batch(toy_batch(np.random.default_rng(0)), mesh)
  state, _ = step.jit_train_step(task, mesh)(state, teacher_vars, batch)
  older = checkpoint.map_distillers(afd.per_tap_variables, state)
  assert 'query_0' in older.params['distiller'] and 'query_0' in older.batch_stats['distiller']
  assert 'query_0' in older.opt_state[1][0].trace['distiller']  # SGD's momentum
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=1)
  ckpts.save(1, older, {'step': 1})
  ckpts.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, _ = ckpts.restore_latest(abstract)
  ckpts.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding


@pytest.fixture(scope='module')
def reference(digits_data_dir, tmp_path_factory):
  """An uninterrupted run: its workdir and summary."""
  workdir = tmp_path_factory.mktemp('reference')
  result = runs.cli(run_args(digits_data_dir, plot_attention=True), workdir=str(workdir),
                    check=True, devices=DEVICES)
  assert f'{STEPS_PER_EPOCH} steps/epoch, {STEPS} steps' in result.stdout
  return workdir, runs.summary(workdir)


def test_a_model_from_a_test_file_trains_as_the_student_with_auto_taps(reference):
  """`python -m afd_jax.main --config.student.name=tests.byo_models:tiny_convnet
  --config.student.taps=auto`: trained, checkpointed, summary.json and the attention plot, labelled
  with the taps found (its kill-and-resume exactness: the tests below)."""
  workdir, summary = reference
  assert summary['final_step'] == STEPS and summary['eval']['count'] == 360
  assert checkpoint.Checkpoints(str(workdir), create=False).steps()[-1] == STEPS
  names = json.loads((workdir / 'attention' / 'taps.json').read_text())
  assert names == {'student': [f'stage{s}_block{i}' for s in (0, 1) for i in (0, 1)],
                   'teacher': ['layer1.0', 'layer2.0', 'layer3.0']}
  assert np.load(workdir / 'attention' / f'{STEPS:08d}.npy').shape == (3, 4)
  assert (workdir / 'attention.png').stat().st_size > 1000


def start_cli(args, workdir):
  """The CLI in the background, stdout and stderr in one pipe."""
  return subprocess.Popen([sys.executable, '-m', 'afd_jax.main', *args, f'--workdir={workdir}'],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=runs.env(DEVICES), cwd=runs.REPO)


def resume_and_compare(digits_data_dir, workdir, reference, saved):
  """Reruns the command on `workdir`: it resumes from its checkpoint (if `saved`) in an earlier
  epoch than the one it ends in, and ends in the uninterrupted run's state, bit for bit (step,
  parameters, batch statistics, optimizer state, RNG). Returns the rerun's stdout."""
  resumed = runs.cli(run_args(digits_data_dir), workdir=str(workdir), check=True,
                     devices=DEVICES)
  match = re.search(r'resumed from .* at step (\d+)', resumed.stdout)
  assert bool(match) == saved, resumed.stdout[-2000:]
  start = int(match.group(1)) if match else 0
  assert start // STEPS_PER_EPOCH < (STEPS - 1) // STEPS_PER_EPOCH, start
  assert re.findall(r'eval at step (\d+)', resumed.stdout) == [
      str(s) for s in range(STEPS_PER_EPOCH, STEPS + 1, STEPS_PER_EPOCH) if s > start]
  summary = runs.summary(workdir)
  assert summary['final_step'] == STEPS
  assert summary['state_sha256'] == reference[1]['state_sha256']
  assert summary['params_sha256'] == reference[1]['params_sha256']
  assert summary['eval'] == reference[1]['eval']
  # The training time counts the interrupted run's too (up to its last checkpoint).
  assert summary['train_time_sec'] > summary['wall_time_sec'] > 0
  return resumed.stdout


def test_second_run_refuses_then_sigkill_of_the_holder_and_the_rerun_ends_identical(
    digits_data_dir, reference, tmp_path):
  """Two runs started together on one workdir: one holds it, the other exits at once with one
  line naming the holder. The holder is SIGKILLed in epoch 0, after a checkpoint, possibly in the
  middle of an asynchronous save; a rerun takes the dead holder's lock over, resumes and ends
  exactly where the uninterrupted run ended."""
  workdir = tmp_path / 'run'
  procs = [start_cli(run_args(digits_data_dir), workdir) for _ in range(2)]
  try:
    outputs, stopped = [[], []], []

    def read(i):  # The holder is frozen (SIGSTOP) at its first step >= 7 after a checkpoint, so
      for line in procs[i].stdout:  # it cannot run on however slowly the other one starts.
        outputs[i].append(line)
        match = re.match(r'step (\d+)/', line)
        if (match and int(match.group(1)) >= 7 and not stopped
            and checkpoint.has_checkpoints(str(workdir))):
          procs[i].send_signal(signal.SIGSTOP)
          stopped.append(i)

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in (0, 1)]
    for reader in readers:
      reader.start()
    deadline = time.time() + 240
    while not (stopped and any(p.poll() is not None for p in procs)) and time.time() < deadline:
      time.sleep(0.2)
    assert stopped, [''.join(o)[-2000:] for o in outputs]
    holder, loser = procs[stopped[0]], procs[1 - stopped[0]]
    assert loser.wait(timeout=60) == 2 and holder.poll() is None
    readers[1 - stopped[0]].join(timeout=60)
    loser_output = ''.join(outputs[1 - stopped[0]])
    assert 'Traceback' not in loser_output and 'step ' not in loser_output
    errors = [line for line in loser_output.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, loser_output
    assert f'{workdir} is in use by another run (pid {holder.pid} on {socket.gethostname()}' \
        in errors[0]

    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL
  finally:  # a failed assertion leaves no process behind (the holder may be stopped)
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert not (workdir / 'summary.json').exists() and checkpoint.has_checkpoints(str(workdir))
  output = resume_and_compare(digits_data_dir, workdir, reference, saved=True)
  assert (f'took over the lock of a run that is gone in {workdir} (pid {holder.pid} on '
          f'{socket.gethostname()})') in output
  assert (workdir / workdir_lock.LOCK).read_text() == ''  # released: no holder named


def test_sigterm_saves_and_the_rerun_skips_a_save_killed_mid_write(digits_data_dir, reference,
                                                                 tmp_path):
  """SIGTERM in epoch 1: the run saves its step and exits with 143. What a kill during a later
  asynchronous save would leave (an unfinished tmp folder of a newer step) is then planted: the
  rerun skips it, resumes from the preemption save and ends identical to the uninterrupted run;
  the unfinished folder is left in place (nothing of the user's is deleted)."""
  workdir = tmp_path / 'run'
  proc = start_cli(run_args(digits_data_dir), workdir)
  output = []
  for line in proc.stdout:
    output.append(line)
    match = re.match(r'step (\d+)/', line)
    if match and int(match.group(1)) >= 13:
      proc.send_signal(signal.SIGTERM)
      break
  output = ''.join(output + proc.stdout.readlines())
  assert proc.wait(timeout=300) == 143, output[-2000:]  # saved, then stopped
  assert 'preemption notice' in output and not (workdir / 'summary.json').exists()
  latest = checkpoint.Checkpoints(str(workdir), create=False).steps()[-1]
  assert STEPS_PER_EPOCH < latest < 2 * STEPS_PER_EPOCH, latest  # in epoch 1
  partial = workdir / 'checkpoints' / f'{latest + 1}.orbax-checkpoint-tmp-1700000000'
  shutil.copytree(workdir / 'checkpoints' / str(latest), partial)
  for f in list((partial / 'state').rglob('*'))[::2]:
    if f.is_file():
      f.unlink()
  output = resume_and_compare(digits_data_dir, workdir, reference, saved=True)
  assert f'at step {latest}' in output
  assert partial.exists()


def test_a_run_without_prefetch_ends_identical(digits_data_dir, reference, tmp_path):
  """`config.prefetch=False` makes each batch just before its step instead of during the step
  before: the same batches in the same order, so the same final state as the reference run."""
  workdir = tmp_path / 'run'
  runs.cli(run_args(digits_data_dir, prefetch=False), workdir=str(workdir), check=True,
           devices=DEVICES)
  summary = runs.summary(workdir)
  assert summary['final_step'] == STEPS
  assert summary['state_sha256'] == reference[1]['state_sha256']


def test_non_finite_loss_stops_before_any_checkpoint_of_it(digits_data_dir, tmp_path):
  """The NaN falls on step 10, which would be checkpointed twice over (a multiple of
  checkpoint_every_steps=5 and an epoch end) but is no log step: the guard still runs before the
  save. The CLI exits with 2 and one line on stderr; step 10 is never written."""
  nan_step = 10
  assert nan_step % 5 == 0 and nan_step % STEPS_PER_EPOCH == 0  # periodic save and epoch end
  result = runs.cli(run_args(digits_data_dir, debug_nan_at_step=nan_step, log_every_steps=1000),
                    workdir=str(tmp_path), devices=DEVICES)
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert 'Traceback' not in result.stdout + result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"error: non-finite loss term 'ce' at step {nan_step}"), lines[0]
  assert f'the last good checkpoint is step 5 in {tmp_path / "checkpoints"}' in lines[0]
  assert checkpoint.Checkpoints(str(tmp_path), create=False).steps() == [5]
  variables, meta = weights.restore_raw_variables(str(tmp_path))
  assert meta['step'] == 5
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  assert not (tmp_path / 'summary.json').exists()


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
  from_orbax = weights.load_teacher(teacher_config(digits_data_dir, teacher_run), model, 10,
                                    (8, 8, 1))
  state_dict = {k: torch.from_numpy(np.array(v))
                for k, v in torch_interop.to_state_dict('resnet8', from_orbax).items()}
  torch.save({'model': state_dict}, tmp_path / 'teacher.pth')
  from_pth = weights.load_teacher(teacher_config(digits_data_dir, tmp_path / 'teacher.pth'),
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
  config = runs.tiny_config(digits_data_dir, num_train_steps=STEPS, **BYO_STUDENT)
  if case == 'changed_config':
    config.student.name = 'resnet14'
    expected = "student.name: checkpoint has 'tests.byo_models:tiny_convnet', config has 'resnet14'"
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
    # The unreadable step was moved aside untouched (the rerun saved the step anew).
    (moved,) = (finished_run / checkpoint.UNREADABLE).iterdir()
    newest = f'{STEPS}{os.sep}'
    assert runs.tree_digest(moved) == {k[len(newest):]: v for k, v in before.items()
                                       if k.startswith(newest)}
    before = {k: v for k, v in before.items() if not k.startswith(newest)}
    after = {k: v for k, v in runs.tree_digest(finished_run / 'checkpoints').items()
             if not k.startswith(newest)}
  else:  # (the CLI prints the message as one line and exits with 2: tests/test_train.py)
    with pytest.raises(UserError, match=re.escape(expected)):
      train.train_and_evaluate(config, str(finished_run))
    after = runs.tree_digest(finished_run / 'checkpoints')
  assert after == before


def unlike_any_init(num_classes):
  """resnet8 variables (`num_classes` outputs) that no fresh init gives: random weights shifted
  by +0.1..0.5, batch statistics included."""
  model = models.create('resnet8', num_classes)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1)), train=False))(
      jax.random.PRNGKey(11))
  rng = np.random.default_rng(11)
  return jax.tree.map(lambda x: np.asarray(x + rng.uniform(0.1, 0.5, x.shape), np.float32),
                      variables)


def write_source(kind, variables, tmp_path):
  """A 7-class resnet8 checkpoint: a PyTorch .pth, or a workdir holding the trainer's state."""
  if kind == 'pth':
    torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
    path = tmp_path / 'source.pth'
    torch.save({k: torch.from_numpy(np.array(v))
                for k, v in torch_interop.to_state_dict('resnet8', variables).items()}, path)
    return path
  path = tmp_path / 'source'
  schedule = optax.constant_schedule(0.1)
  task = task_lib.Task(student=models.create('resnet8', 7), tx=optax.sgd(schedule), schedule=schedule)
  state = jax.jit(lambda k: step.init_state(task, k, (8, 8, 1)))(jax.random.PRNGKey(1))
  state = state.replace(params={**state.params, 'student': variables['params']},
                        batch_stats={**state.batch_stats, 'student': variables['batch_stats']})
  ckpts = checkpoint.Checkpoints(str(path), async_save=False)
  ckpts.save(4, state, {'fingerprint': {'student.name': 'resnet8', 'num_classes': 7}, 'step': 4})
  ckpts.close()
  return path


@pytest.mark.parametrize('kind', ['pth', 'workdir'])
def test_student_init_checkpoint_of_another_class_count_gets_a_fresh_classifier(
    digits_data_dir, tmp_path, monkeypatch, capsys, kind):
  """student.init_checkpoint from a 7-class model on 10-class digits: the state the first step
  receives holds the source's body weights and batch statistics exactly, and a fresh 10-class fc."""
  source = unlike_any_init(7)
  path = write_source(kind, source, tmp_path)
  first_state = []
  real_jit_train_step = step.jit_train_step

  def recording_jit_train_step(task, mesh, *placements):
    train_step = real_jit_train_step(task, mesh, *placements)

    def recorded(state, teacher_vars, batch):
      if not first_state:
        first_state.append(jax.device_get({'params': state.params['student'],
                                           'batch_stats': state.batch_stats['student']}))
      return train_step(state, teacher_vars, batch)
    return recorded

  monkeypatch.setattr(step, 'jit_train_step', recording_jit_train_step)
  config = runs.tiny_config(digits_data_dir, run='student', num_train_steps=1,
                            student__init_checkpoint=str(path))
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert f'student initialised from {path}' in capsys.readouterr().out
  assert summary['final_step'] == 1 and len(first_state) == 1
  flat = lambda tree: {jax.tree_util.keystr(p): x
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = flat(first_state[0]), flat(source)
  assert set(got) == set(want)
  head = {"['params']['fc']['kernel']", "['params']['fc']['bias']"}
  for key in sorted(set(got) - head):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  kernel, bias = got["['params']['fc']['kernel']"], got["['params']['fc']['bias']"]
  assert want["['params']['fc']['kernel']"].shape == (64, 7)
  assert kernel.shape == (64, 10) and bias.shape == (10,)
  # Fresh: PyTorch's Linear init, uniform within 1/sqrt(fan_in); the source's head is not there.
  bound = 1 / np.sqrt(64)
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound and kernel.std() > bound / 4
  assert not np.isin(kernel, want["['params']['fc']['kernel']"]).any()


@pytest.mark.parametrize('metric', ['top1', 'miou'])
def test_keep_best_prunes_to_exactly_the_latest_and_the_best(tmp_path, metric):
  """keep_checkpoints=1 with keep_best: of five saves only the latest and the best eval top-1
  (segmentation: mIoU) remain; a save without eval metrics (a periodic one) is never the best.
  Without keep_best: the latest only."""
  state = {'w': np.arange(4, dtype=np.float32)}
  saves = ((1, 40.0), (2, 70.0), (3, None), (4, 55.0), (5, None))
  for keep_best, kept in ((True, [2, 5]), (False, [5])):
    workdir = str(tmp_path / str(keep_best))
    ckpts = checkpoint.Checkpoints(workdir, keep=1, keep_best=keep_best)
    for step_count, value in saves:
      ckpts.save(step_count, state, {'step': step_count},
                 metrics=None if value is None else {metric: value})
    ckpts.close()
    assert checkpoint.Checkpoints(workdir, create=False).steps() == kept, keep_best


def test_a_run_with_keep_best_keeps_the_latest_and_the_best_eval(digits_data_dir, tmp_path, capsys):
  """The trainer's wiring of the same policy: 3 epochs of 10 steps, saves every 5 steps, the
  learning rate x100 in epoch 3 so that the last eval is not the best; only the latest and the
  best-top1 checkpoints remain."""
  config = runs.tiny_config(digits_data_dir, run='student', num_train_steps=30,
                            dataset__train_subset=320, checkpoint_every_steps=5,
                            keep_checkpoints=1, keep_best=True, log_every_steps=1000,
                            optimizer__decay_epochs=(3,), optimizer__decay_factor=100.0)
  train.train_and_evaluate(config, str(tmp_path))
  evals = {int(s): float(t) for s, t in
           re.findall(r'eval at step (\d+): top1 ([\d.]+)', capsys.readouterr().out)}
  assert sorted(evals) == [10, 20, 30]
  best = max(evals, key=evals.get)
  assert best != 30 and list(evals.values()).count(evals[best]) == 1, evals
  ckpts = checkpoint.Checkpoints(str(tmp_path), create=False)
  assert ckpts.steps() == [best, 30]
  assert round(ckpts.read_meta(best)['eval']['top1'], 2) == evals[best]

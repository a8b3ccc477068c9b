"""The training loop end to end on `digits`: summary, metrics and checkpoints, resume from
another workdir to the straight run's state, two processes equal to one, CLI errors, and the
attention plot redrawn (or refused for a run without one)."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from afd_jax import checkpoint, train, visualize, weights
from afd_jax.errors import UserError
from tests import runs


@pytest.fixture(scope='module')
def afd_run(digits_data_dir, tmp_path_factory):
  """A finished tiny AFD run: (workdir, summary)."""
  workdir = tmp_path_factory.mktemp('afd_run')
  config = runs.tiny_config(digits_data_dir, num_train_steps=6, eval_every_epochs=1,
                            plot_attention=True)
  return workdir, train.train_and_evaluate(config, str(workdir))


def test_train_and_evaluate_writes_summary_logs_and_checkpoints(afd_run):
  tmp_path, summary = afd_run
  assert summary['status'] == 'finished' and summary['final_step'] == 6
  assert summary['eval']['count'] == 360  # every test example exactly once
  assert 0 <= summary['eval']['top1'] <= summary['eval']['top5'] <= 100
  assert summary['teacher_eval']['count'] == 360
  assert len(summary['params_sha256']) == len(summary['state_sha256']) == 64
  assert summary['state_sha256'] != summary['params_sha256']  # more than the parameters
  assert summary['train_time_sec'] == summary['wall_time_sec'] > 0  # one uninterrupted run
  assert set(summary['train']) >= {'loss', 'ce', 'kd', 'afd', 'top1', 'learning_rate'}
  assert runs.summary(tmp_path) == summary
  assert checkpoint.Checkpoints(str(tmp_path), create=False).steps() == [5, 6]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))
  attention = np.load(tmp_path / 'attention' / '00000006.npy')
  assert attention.shape == (3, 3)
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
  assert (tmp_path / 'attention.png').stat().st_size > 1000
  assert (tmp_path / 'config.json').exists()


def test_resume_from_continues_another_workdirs_latest_checkpoint(afd_run, digits_data_dir,
                                                                  tmp_path, capsys):
  """A new workdir with resume_from=<afd_run> starts from its latest checkpoint (step 6), keeps
  counting from there, leaves the source untouched, and ends in exactly the state of a run that
  trained the 9 steps straight through; rerun, it resumes from its own checkpoint first."""
  source, _ = afd_run
  before = runs.tree_digest(source / 'checkpoints')
  capsys.readouterr()
  config = runs.tiny_config(digits_data_dir, num_train_steps=9, resume_from=str(source))
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert f'resumed from {source} (resume_from) at step 6' in capsys.readouterr().out
  assert resumed['final_step'] == 9
  assert checkpoint.Checkpoints(str(tmp_path / 'resumed'), create=False).steps() == [9]
  assert runs.tree_digest(source / 'checkpoints') == before
  straight = train.train_and_evaluate(runs.tiny_config(digits_data_dir, num_train_steps=9),
                                      str(tmp_path / 'straight'))
  assert resumed['state_sha256'] == straight['state_sha256']
  assert resumed['train_time_sec'] > resumed['wall_time_sec']  # afd_run's time included
  again = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert f'resumed from {tmp_path / "resumed"} (own checkpoint) at step 9' in capsys.readouterr().out
  assert again['state_sha256'] == resumed['state_sha256']


def test_two_processes_equal_one_process(digits_data_dir, tmp_path):
  """2 processes x 4 fake devices (loopback coordinator, gloo) == 1 process x 8 devices."""
  overrides = dict(num_train_steps=3, dataset__num_shards=2, checkpoint_every_steps=0)
  single = train.train_and_evaluate(runs.tiny_config(digits_data_dir, **overrides),
                                    str(tmp_path / 'single'))
  assert jax.device_count() == 8
  cmd = [str(runs.REPO / 'launch' / 'local_multiprocess.sh'), '2', sys.executable, '-m',
         'afd_jax.main', *runs.flag_args(digits_data_dir, **overrides),
         f'--workdir={tmp_path / "multi"}']
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=runs.env(),
                          cwd=runs.REPO)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert '[p0]' in result.stdout and '[p1]' in result.stdout
  # One job of 8 devices, not two independent 4-device runs.
  assert ', 8 devices x 2 processes,' in result.stdout
  multi = runs.summary(tmp_path / 'multi')
  for key in ('loss', 'ce', 'kd', 'afd'):
    # atol as in test_step: float32 summation order on the small terms (afd ~0.03 here).
    np.testing.assert_allclose(multi['train'][key], single['train'][key], rtol=1e-5, atol=1e-6)
  for part in ('student', 'distiller'):  # the student and the AFD meta-network
    a, meta_a = weights.restore_raw_variables(str(tmp_path / 'single'), part)
    b, meta_b = weights.restore_raw_variables(str(tmp_path / 'multi'), part)
    assert meta_a['step'] == meta_b['step'] == 3
    assert jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.leaves(a['params'])
    diff = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)
    assert max(jax.tree.leaves(diff)) <= 1e-5, (part, diff)  # params and batch statistics
  assert multi['eval']['count'] == single['eval']['count'] == 360
  assert len(multi['state_sha256']) == 64  # the whole replicated state, hashed across processes


@pytest.mark.parametrize('extra, message', [
    (['--config.studnet.name=resnet8'], 'studnet'),
    (['--config.student.name=resnet9'], "Unknown model 'resnet9'"),
    (['--config.dataset.name=no_such_dataset'], 'no_such_dataset'),
    (['--config.teacher.checkpoint=/nonexistent/teacher'], '/nonexistent/teacher does not exist'),
    (['--config.method=crdd'], "Unknown method 'crdd'"),
    (['--no_such_flag=1'], 'no_such_flag'),
    # A method that cannot work with the pair: ReviewKD links stage to stage.
    (['--config.method=reviewkd', '--config.teacher.name=resnet18'],
     'the student has 3 stages and the teacher 4'),
])
def test_bad_input_is_one_clear_line(digits_data_dir, tmp_path, extra, message):
  args = runs.flag_args(digits_data_dir, num_train_steps=1)
  result = runs.cli_in_process(args + extra, workdir=str(tmp_path / 'w'))
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr + result.stdout
  assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not result.stdout.strip()  # refused before the run printed anything
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_visualize_redraws_the_attention_plot(afd_run, tmp_path):
  workdir, _ = afd_run
  result = subprocess.run([sys.executable, '-m', 'afd_jax.visualize', f'--workdir={workdir}',
                           f'--out={tmp_path / "saved.png"}'], capture_output=True, text=True,
                          timeout=300, env=runs.env(), cwd=runs.REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  assert '3 teacher x 3 student layers (saved at step 6)' in result.stdout
  assert (tmp_path / 'saved.png').stat().st_size > 1000
  config = visualize.load_config(str(workdir))
  attention, step_count, _ = visualize.checkpoint_attention(str(workdir), config)
  assert step_count == 6 and attention.shape == (3, 3)
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)


def test_visualize_refuses_a_run_without_attention(digits_data_dir, tmp_path):
  config = runs.tiny_config(digits_data_dir, run='student', num_train_steps=1)
  train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(UserError, match="'none' run; only the methods that learn layer links"):
    visualize.load_config(str(tmp_path))

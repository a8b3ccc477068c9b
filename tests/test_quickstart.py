"""The quick-start's pieces: the shipped teacher is the trained model it claims to be, exported
variables load exactly like the run they came from, and the table reports mean ± std."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import checkpoint, models, quickstart, weights
from afd_jax.errors import UserError
from afd_jax.data import stats
from configs import quickstart as quickstart_config
from tests import runs

FASHION_DIR = '/usr/share/datasets/fashion-mnist'


def test_shipped_teacher_is_a_trained_resnet20():
  if not os.path.isdir(FASHION_DIR):
    pytest.skip(f'Debian dataset-fashion-mnist not installed at {FASHION_DIR} '
                '(launch/setup.sh installs it as root)')
  from afd_jax.data.builders import fashion_mnist_local  # pylint: disable=g-import-not-at-top
  model = models.create('resnet20', 10)
  variables = weights.load_model_variables(quickstart_config.TEACHER_CHECKPOINT, 'resnet20',
                                           model, 10, (28, 28, 1), 'teacher checkpoint')
  images, labels = fashion_mnist_local.load_split(FASHION_DIR, 'test')
  x = (images[:1000].astype(np.float32) / 255 - np.float32(stats.FASHION_MNIST_MEAN)) / \
      np.float32(stats.FASHION_MNIST_STD)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  top1 = 100 * float(np.mean(np.argmax(np.asarray(logits), -1) == labels[:1000]))
  assert top1 >= 85.0, top1  # an untrained resnet20 scores ~10


def test_exported_variables_load_like_the_run_they_came_from(tmp_path):
  # A run's checkpoint as train.py writes it (state items per model, meta with the fingerprint).
  run = tmp_path / 'run'
  variables = models.create('resnet8', 10).init(jax.random.PRNGKey(1), jnp.zeros((2, 8, 8, 1)),
                                               train=False)
  ckpt = checkpoint.Checkpoints(str(run), async_save=False)
  ckpt.save(3, {'params': {'student': variables['params']},
                'batch_stats': {'student': variables['batch_stats']}, 'step': 3},
            {'fingerprint': {'student.name': 'resnet8', 'num_classes': 10}, 'step': 3})
  ckpt.close()
  out = tmp_path / 'resnet8.msgpack'
  export = [sys.executable, '-m', 'afd_jax.export', f'--workdir={run}', '--model=resnet8',
            f'--out={out}']
  subprocess.run(export, check=True, capture_output=True, env=runs.env(1), cwd=runs.REPO)
  model = models.create('resnet8', 10)
  load = lambda path: weights.load_model_variables(str(path), 'resnet8', model, 10, (8, 8, 1),
                                                   'teacher checkpoint')
  from_run, from_file = load(run), load(out)
  jax.tree.map(np.testing.assert_array_equal, from_run, from_file)
  jax.tree.map(np.testing.assert_array_equal, from_file, jax.device_get(variables))
  with pytest.raises(UserError, match="holds a 'resnet8' model, not 'resnet14'"):
    weights.load_model_variables(str(out), 'resnet14', models.create('resnet14', 10), 10,
                                 (8, 8, 1), 'teacher checkpoint')
  # The exporter never overwrites.
  before = out.read_bytes()
  result = subprocess.run(export, capture_output=True, text=True, env=runs.env(1), cwd=runs.REPO)
  assert result.returncode == 2 and 'exists; not overwriting it' in result.stderr
  assert 'Traceback' not in result.stderr and out.read_bytes() == before


def test_table_reports_mean_and_std_over_seeds():
  def summary(top1, teacher=90.0):
    return {'eval': {'top1': top1}, 'teacher_eval': {'top1': teacher}}
  results = {'student': [summary(80.0), summary(82.0)], 'kd': [summary(83.0), summary(83.0)],
             'afd': [summary(84.0), summary(86.0)]}
  lines = quickstart.table(results).splitlines()
  assert '| teacher (shipped) | resnet20 |     90.00 |' in lines
  assert '| student alone     | resnet8  | 81.00 ± 1.41 |' in lines
  assert '| student with AFD  | resnet8  | 85.00 ± 1.41 |' in lines
  one = quickstart.table({k: v[:1] for k, v in results.items()}).splitlines()
  assert '| student with KD   | resnet8  |     83.00 |' in one

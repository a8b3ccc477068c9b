"""float64 mode: afd_jax's own train step follows the official AFD training, step by step.

tests/reference/replay_afd_float64.npz holds five training steps of the official code run in
float64 by tests/reference/make_replay_vectors.py (resnet20 -> resnet8 on 10 x 10 images,
batch 4, AFD with qk_dim 32; CE + 0.9 KD(T=4) + 200 AFD; SGD, momentum 0.9, weight decay 5e-4
on the student and the AFD module; teacher in eval mode). Here the same initial weights
(redrawn from the file's seeds by tests/reference/weights.py) enter a Task that
`task_lib.task_from_config` builds from a config with `dtype='float64'`, as train.py builds it,
and `step.make_train_step` replays the same batches. Every step's CE, KD, AFD and total loss,
and the final parameters and running statistics stored, agree within 1e-9 relative. In
float32, rounding grows chaotically over training steps (to 1e-3 after ten steps), so only
float64 can show that the whole trajectory is the official one.

Also: a float64 run's state is float64 in every floating leaf (parameters, batch statistics,
optimizer state), and so are the step's losses; float64 is refused without jax_enable_x64, on a
TPU, with a narrower teacher dtype, and for a model that casts its logits or taps to float32;
x64 is on only inside the float64 mode (nothing leaks into other tests).
"""
import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from afd_jax import step
from afd_jax import task as task_lib
from afd_jax.interop import torch as torch_interop
from afd_jax.state import TrainState
from configs import base
from tests.reference import weights

REPLAY = pathlib.Path(__file__).resolve().parent / 'reference' / 'replay_afd_float64.npz'
TOLERANCE = 1e-9  # relative: per scalar |ours - ref| / |ref|, per array by max |ref|
TERMS = ('ce', 'kd', 'afd', 'loss')


def prefixed(data, prefix):
  return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def redrawn(data, prefix):
  """The official state_dict of one module, redrawn from the file's seed, names and shapes."""
  shapes = [s[s >= 0] for s in data[f'{prefix}/shapes']]
  return weights.state_dict(int(data[f'{prefix}/seed']), [str(k) for k in data[f'{prefix}/keys']],
                            shapes, float(data[f'{prefix}/gain']))


def replay_config(data):
  """The official recipe as an afd_jax config, in float64."""
  config = base.get_base_config()
  config.dtype = 'float64'
  config.teacher.name, config.student.name = str(data['teacher']), str(data['student'])
  config.method = 'afd'
  config.afd.qk_dim = int(data['qk_dim'])
  recipe = prefixed(data, 'recipe/')
  config.loss.ce_weight = 1.0
  config.loss.kd_weight = float(recipe['alpha'])
  config.loss.kd_temperature = float(recipe['temperature'])
  config.loss.feature_weight = float(recipe['beta'])
  config.optimizer.learning_rate = float(recipe['lr'])
  config.optimizer.momentum = float(recipe['momentum'])
  config.optimizer.weight_decay = float(recipe['weight_decay'])
  config.optimizer.schedule = 'constant'
  return config


def make_task(data):
  image_shape = data['images'].shape[2:]
  config = replay_config(data)
  task = task_lib.task_from_config(config, int(data['num_classes']), len(data['images']),
                               task_lib.DTYPES[config.dtype], image_shape)
  return task, image_shape


def as_float64(tree):
  return task_lib.cast_floats(tree, jnp.float64)


def initial_state(data, task, image_shape):
  """The official initial weights in afd_jax's float64 train state; the teacher's variables."""
  teacher_vars = as_float64(torch_interop.convert(str(data['teacher']), redrawn(data, 'teacher')))
  student = torch_interop.convert(str(data['student']), redrawn(data, 'student'))
  distiller = torch_interop.convert('afd', redrawn(data, 'afd'))
  fresh = jax.eval_shape(lambda: step.init_state(task, jax.random.PRNGKey(0), image_shape,
                                                 jax.eval_shape(lambda: teacher_vars)))
  take = lambda abstract, official: jax.tree.map(  # the fresh state's structure, or it raises
      lambda a, b: jnp.asarray(b, a.dtype), abstract, official)
  params = take(fresh.params, {'student': student['params'], 'distiller': distiller['params']})
  stats = take(fresh.batch_stats, {'student': student['batch_stats'],
                                   'distiller': distiller['batch_stats']})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                     opt_state=task.tx.init(params), rng=jax.random.PRNGKey(0))
  dtypes = lambda tree: jax.tree.map(lambda x: x.dtype, tree)
  assert dtypes(state) == dtypes(fresh)  # as step.init_state makes it, float64 included
  return state, teacher_vars


@pytest.fixture(scope='module')
def replayed():
  """(reference arrays, per-step metrics, final official-named arrays, final state, task),
  run in float64."""
  data = np.load(REPLAY)
  with jax.enable_x64(True):
    task, image_shape = make_task(data)
    state, teacher_vars = initial_state(data, task, image_shape)
    train_step = jax.jit(step.make_train_step(task))
    history = []
    for images, labels in zip(data['images'], data['labels']):
      batch = {'image': jnp.asarray(images), 'label': jnp.asarray(labels, jnp.int32)}
      state, metrics = train_step(state, teacher_vars, batch)
      history.append({k: np.asarray(metrics[k]) for k in TERMS})
    final = {f'final_student/{k}': v for k, v in torch_interop.to_state_dict(
        str(data['student']), step.variables_of('student', state.params,
                                                state.batch_stats)).items()}
    final.update({f'final_afd/{k}': v for k, v in torch_interop.to_state_dict(
        'afd', step.variables_of('distiller', state.params, state.batch_stats)).items()})
    task_lib.check_float64(task, image_shape)  # the zoo models' logits and taps come out float64
  return data, history, final, state, task


def test_every_step_matches_the_official_float64_run(replayed):
  data, history, *_ = replayed
  assert len(history) == len(data['images']) == 5
  for name in TERMS:
    reference = data[f'step/{name}']
    for i, metrics in enumerate(history):
      ours = metrics[name]
      assert ours.dtype == np.float64, (name, ours.dtype)
      error = abs(float(ours) - reference[i]) / abs(reference[i])
      assert error <= TOLERANCE, f'step {i + 1} {name}: relative error {error:.3g}'
  # The steps change the model: a replay of one state would not match the later steps.
  assert len(set(np.round(data['step/loss'], 6))) == len(history)


def test_final_parameters_and_running_statistics_match(replayed):
  data, _, final, *_ = replayed
  refs = {k: data[k] for k in data.files if k.startswith('final_')}
  assert len(refs) == 12
  for name, ref in refs.items():
    ours = final[name]
    assert ours.dtype == np.float64 and ours.shape == ref.shape, (name, ours.dtype, ours.shape)
    error = np.abs(ours - ref).max() / np.abs(ref).max()
    assert error <= TOLERANCE, f'{name}: relative error {error:.3g}'


def test_a_float64_run_keeps_every_state_leaf_float64(replayed):
  *_, state, task = replayed
  assert task.param_dtype == jnp.float64
  floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  # student and AFD parameters, their batch statistics, and a momentum for every parameter
  assert len(floats) == 2 * len(jax.tree.leaves(state.params)) + len(
      jax.tree.leaves(state.batch_stats))
  assert set(floats) == {np.dtype('float64')}


class CastsToFloat32(nn.Module):
  """A model that casts its logits to float32, as many do."""

  @nn.compact
  def __call__(self, images, train):
    del train
    x = nn.relu(nn.Conv(4, (3, 3))(images))
    return nn.Dense(10)(jnp.mean(x, (1, 2))).astype(jnp.float32), (x,)


def test_a_model_that_casts_to_float32_is_refused_in_float64():
  with jax.enable_x64(True):
    task = task_lib.Task(student=CastsToFloat32(), tx=optax.sgd(0.1),
                     schedule=optax.constant_schedule(0.1), param_dtype=jnp.float64)
    with pytest.raises(ValueError, match='the student model returns float32 logits or taps'):
      task_lib.check_float64(task, (8, 8, 3))
    task_lib.check_float64(dataclasses.replace(task, param_dtype=None), (8, 8, 3))  # float32 mode


def test_float64_needs_x64_and_is_not_left_on(monkeypatch):
  data = np.load(REPLAY)
  assert not jax.config.jax_enable_x64  # the fixtures above left nothing on
  with pytest.raises(ValueError, match='jax_enable_x64'):
    make_task(data)
  from afd_jax import run_guard, train  # pylint: disable=g-import-not-at-top (TensorFlow)
  config = replay_config(data)
  with train.float64_mode(config):
    assert jax.config.jax_enable_x64 and jnp.zeros(1).dtype == jnp.float64
  assert not jax.config.jax_enable_x64
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  with pytest.raises(train.UserError, match='a TPU has no float64 arithmetic'):
    with train.float64_mode(config):
      pass
  assert not jax.config.jax_enable_x64
  config.teacher.dtype = 'bfloat16'
  with pytest.raises(train.UserError, match='leave teacher.dtype empty'):
    run_guard.validate(config)


def test_a_float64_run_does_not_resume_a_float32_workdir_or_the_reverse():
  from afd_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from afd_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  wide, narrow = base.get_base_config(), base.get_base_config()
  wide.dtype = 'float64'
  saved = {'fingerprint': checkpoint.fingerprint(narrow, 10, True)}
  with pytest.raises(UserError, match="state_dtype: checkpoint has 'float32', config has 'float64'"):
    checkpoint.check_compatible(saved, checkpoint.fingerprint(wide, 10, True), 'w')
  narrow.dtype = 'bfloat16'  # activations only: the state stays float32, so it resumes
  checkpoint.check_compatible(saved, checkpoint.fingerprint(narrow, 10, True), 'w')


def test_a_float64_run_through_the_command_line_saves_a_float64_state(digits_data_dir, tmp_path):
  """`python -m afd_jax.main --config.dtype=float64` (in this process): AFD + KD on digits, its
  checkpointed parameters float64, x64 off again afterwards."""
  from tests import runs  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  result = runs.cli_in_process(runs.flag_args(digits_data_dir, num_train_steps=2, dtype='float64'),
                               workdir=str(workdir))
  assert result.returncode == 0, result.stderr[-2000:]
  assert runs.summary(workdir)['final_step'] == 2 and not jax.config.jax_enable_x64
  from afd_jax import train  # pylint: disable=g-import-not-at-top
  from afd_jax.weights import restore_raw_variables  # pylint: disable=g-import-not-at-top
  config = base.get_base_config()
  config.dtype = 'float64'
  with train.float64_mode(config):  # (without x64 JAX would read float64 as float32)
    variables, _ = restore_raw_variables(str(workdir))
  dtypes = {str(x.dtype) for x in jax.tree.leaves(variables)}
  assert dtypes == {'float64'}, dtypes

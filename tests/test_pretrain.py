"""The pre-training stage of a method (the CRD benchmark's `init_epochs`: AB, FT, FSP).

`registry.Pretrain` names what the stage trains; `step.make_pretrain_step` minimises the
method's own `pretrain_loss` with its own SGD state, then the main stage begins with a fresh
main optimizer. Shown here with a toy method registered by the test, so the engine is tested
apart from any one method: what the stage trains, an exact resume across the stage's end, a
log window across it, and the checkpoint's record of the stage's length. AB's, FT's and FSP's
stages against RepDistiller's `init()`: tests/test_parity_pretrain_methods.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import run_guard, sharding, step, train
from afd_jax.distill import registry
from configs import methods
from tests import runs
from tests.test_methods import IMAGE, fixed_batch, mesh8, task_for


class Reconstruct(nn.Module):
  """Pre-training: a 1x1 conv learns to map the teacher's last map to half of it, and the
  student's last map learns to match the teacher's; main: the student's last map, through the
  same conv, matches the teacher's."""

  def setup(self):  # a module with two entry points declares its layers in setup
    self.conv = nn.Conv(16, (1, 1))

  def __call__(self, student_features, teacher_features, train):
    t = jax.lax.stop_gradient(teacher_features[-1])
    return jnp.mean(jnp.square(self.conv(student_features[-1]) - t[..., :16])), None

  def pretrain_loss(self, student_features, teacher_features, train):
    t = jax.lax.stop_gradient(teacher_features[-1])
    body = jnp.mean(jnp.square(student_features[-1][..., :16] - t[..., :16]))
    return jnp.mean(jnp.square(self.conv(t) - 0.5 * t[..., :16])) + body, None


@pytest.fixture
def toy_pretrain_method():
  method = registry.register(registry.Method(
      'toy_pretrain', build=lambda config, setting: Reconstruct(), feature_weight=1.0,
      pretrain=registry.Pretrain(trains=('distiller', 'student_body'), epochs=3,
                                 learning_rate=0.01)))
  yield method
  registry._METHODS.pop(method.name)  # pylint: disable=protected-access


def test_pretrain_step_trains_only_what_it_names(toy_pretrain_method):
  """During the stage: the distiller and the student body move, the student's classifier does
  not, the main optimizer's state is untouched; the schedule's reported rate is the stage's."""
  task, mesh = task_for('toy_pretrain'), mesh8()
  assert task.pretrain.steps == 2 and task.pretrain.classifier == ('fc',)
  rep = sharding.replicated(mesh)
  teacher_vars = jax.device_put(jax.jit(lambda k: task.teacher.init(
      k, jnp.zeros((2,) + IMAGE), train=False))(jax.random.PRNGKey(1)), rep)
  state0 = step.jit_init_state(task, mesh, IMAGE, jax.eval_shape(lambda: teacher_vars))(
      jax.random.PRNGKey(0))
  before = jax.device_get(state0)
  batch = sharding.global_batch(fixed_batch(), mesh)
  state, m = step.jit_pretrain_step(task, mesh)(state0, teacher_vars, batch)
  after = jax.device_get(state)
  moved = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())
  diff = jax.tree.map(moved, after.params, before.params)
  assert diff['student']['fc']['kernel'] == 0 and diff['student']['fc']['bias'] == 0
  assert diff['student']['conv1']['kernel'] > 0
  assert diff['distiller']['conv']['kernel'] > 0
  assert max(jax.tree.leaves(jax.tree.map(moved, after.opt_state[1], before.opt_state[1]))) == 0
  assert float(m['learning_rate']) == pytest.approx(0.01)
  # Student in training mode while its body trains: its batch statistics moved.
  assert max(jax.tree.leaves(jax.tree.map(moved, after.batch_stats['student'],
                                          before.batch_stats['student']))) > 0
  # The main step then moves the classifier and counts its own schedule from zero.
  state, m = step.jit_train_step(task, mesh)(state, teacher_vars, batch)
  assert float(m['learning_rate']) == pytest.approx(0.005)
  assert moved(jax.device_get(state.params)['student']['fc']['kernel'],
               after.params['student']['fc']['kernel']) > 0


def test_a_run_interrupted_in_the_stage_resumes_across_it_exactly(
    toy_pretrain_method, digits_data_dir, tmp_path, monkeypatch):
  """Stopped (preemption notice) inside the pre-training stage and rerun, the run crosses into
  the main stage and ends with the whole state of the uninterrupted run, bit for bit."""
  def config():
    c = runs.tiny_config(digits_data_dir, run='student', num_train_steps=4)
    methods.set_method(c, 'toy_pretrain')
    c.teacher.name, c.teacher.checkpoint = 'resnet8', 'random'
    c.pretrain.epochs = 0.1  # a few steps of the stage at digits' steps per epoch
    return c

  whole = train.train_and_evaluate(config(), str(tmp_path / 'whole'))
  pretrain_steps = whole['total_steps'] - 4
  assert pretrain_steps >= 3
  stop_at = pretrain_steps - 1
  monkeypatch.setattr(run_guard.PreemptionWatch, 'reached', lambda self, done: done == stop_at)
  first = train.train_and_evaluate(config(), str(tmp_path / 'cut'))
  assert first['final_step'] == stop_at and first['status'] == 'preempted'
  monkeypatch.undo()
  resumed = train.train_and_evaluate(config(), str(tmp_path / 'cut'))
  assert resumed['final_step'] == whole['final_step'] == pretrain_steps + 4
  assert resumed['state_sha256'] == whole['state_sha256']
  assert resumed['eval'] == whole['eval']


def test_a_log_window_across_the_stage_boundary_and_the_fingerprint(toy_pretrain_method):
  """A logging window holding stage and main steps averages each term over the steps that have
  it; a checkpoint of a method with a stage records where the stage ends (config.pretrain.*),
  so a resume with another stage length is refused instead of silently moving the boundary."""
  from afd_jax import checkpoint, metrics  # pylint: disable=g-import-not-at-top
  window = [{'pretrain': np.float32(2.0), 'loss': np.float32(2.0)},
            {'ce': np.float32(1.0), 'loss': np.float32(4.0)}]
  means = metrics.mean_metrics(window)
  assert (means['pretrain'], means['ce'], means['loss']) == (2.0, 1.0, 3.0)
  c = methods.get_config('toy_pretrain')
  saved = checkpoint.fingerprint(c, 10, True)
  assert saved['pretrain.epochs'] == -1.0
  c.pretrain.epochs = 2.0
  with pytest.raises(Exception, match='pretrain.epochs'):
    checkpoint.check_compatible({'fingerprint': saved}, checkpoint.fingerprint(c, 10, True), 'w')
  assert 'pretrain.epochs' not in checkpoint.fingerprint(methods.get_config('afd'), 10, True)

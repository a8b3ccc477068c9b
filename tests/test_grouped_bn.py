"""Grouped ("ghost") batch norm (`config.bn_group_size`): the maths of the groups, no
cross-device reduction in the forward pass, the same training on 1 and 8 devices, and the
collective count of the compiled step. Also the teacher at its own dtype, and the refusals
(a bad group size or teacher dtype, flax's own BatchNorm under groups)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import collectives, layers, run_guard, sharding, step
from afd_jax import task as task_lib
from afd_jax.distill import AFD
from afd_jax.errors import UserError
from configs import base
from tests import test_step
from tests.test_step import mesh_of, setup, tiny_task, toy_batch

GROUP = 2  # the per-device batch of a 16-example batch on 8 devices


@pytest.fixture(scope='module')
def batches():
  rng = np.random.default_rng(0)
  return [toy_batch(rng) for _ in range(3)]


def test_batch_norm_normalises_each_group_and_averages_the_group_statistics():
  """Each group of k consecutive examples is normalised with its own mean and biased variance;
  the running estimates move towards the mean over groups of each group's mean and unbiased
  variance; one group is the global batch norm, bit for bit."""
  bn = layers.BatchNorm(momentum=0.1)
  x = 2 * jax.random.normal(jax.random.PRNGKey(0), (12, 3, 3, 5)) + jnp.arange(12.)[:, None, None,
                                                                                   None]
  variables = bn.init(jax.random.PRNGKey(1), x, train=False)
  variables = {'params': {'scale': jnp.full((5,), 1.5), 'bias': jnp.full((5,), 0.25)},
               'batch_stats': {'mean': jnp.full((5,), 0.5), 'var': jnp.full((5,), 2.0)}}
  apply = lambda: bn.apply(variables, x, train=True, mutable=['batch_stats'])
  y_global, s_global = apply()
  with layers.batch_norm_groups(12):
    y_one, s_one = apply()
  np.testing.assert_array_equal(y_one, y_global)
  jax.tree.map(np.testing.assert_array_equal, s_one, s_global)
  with layers.batch_norm_groups(4):
    y, s = apply()
  xs = np.asarray(x, np.float64).reshape(3, 4, 3, 3, 5)
  mean = xs.mean((1, 2, 3), keepdims=True)
  var = xs.var((1, 2, 3), keepdims=True)
  expected = ((xs - mean) / np.sqrt(var + 1e-5) * 1.5 + 0.25).reshape(x.shape)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  n = 4 * 3 * 3
  np.testing.assert_allclose(s['batch_stats']['mean'], 0.9 * 0.5 + 0.1 * mean.mean(0).ravel(),
                             rtol=1e-5)
  np.testing.assert_allclose(s['batch_stats']['var'],
                             0.9 * 2.0 + 0.1 * (var * n / (n - 1)).mean(0).ravel(), rtol=1e-5)
  assert not np.allclose(y, y_global, atol=1e-2)  # the groups differ (their means differ)
  with pytest.raises(ValueError, match='bn_group_size=5 does not divide the batch of 12'):
    with layers.batch_norm_groups(5):
      apply()


def test_afd_with_groups_equals_afd_on_each_group_alone():
  """The AFD meta-network's batch norms (including the bilinear one, computed through the
  covariance) under groups of k: each group's attention equals AFD run on that group alone, the
  loss is the mean of the groups' losses, the running statistics the mean of theirs."""
  rng = np.random.default_rng(0)
  feats = lambda shapes: [jnp.asarray(rng.normal(size=(8,) + s) + 0.3 * i, jnp.float32)
                          for i, s in enumerate(shapes)]
  student, teacher = feats([(4, 4, 6), (2, 2, 6)]), feats([(4, 4, 8), (2, 2, 8), (2, 2, 4)])
  afd = AFD(qk_dim=8)
  variables = afd.init(jax.random.PRNGKey(0), student, teacher, train=False)

  @functools.partial(jax.jit, static_argnames='group_size')
  def apply(s, t, group_size=0):  # the context inside the jitted function, as in the step
    with layers.batch_norm_groups(group_size):
      return afd.apply(variables, s, t, train=True, mutable=['batch_stats'])

  (loss, attention), stats = apply(student, teacher, group_size=4)
  parts = [apply([f[g:g + 4] for f in student], [f[g:g + 4] for f in teacher]) for g in (0, 4)]
  np.testing.assert_allclose(attention, jnp.concatenate([p[0][1] for p in parts]), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(loss, (parts[0][0][0] + parts[1][0][0]) / 2, rtol=1e-5)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-5, atol=1e-6),
               stats, parts[0][1], parts[1][1])
  (loss_global, _), _ = apply(student, teacher)
  assert abs(float(loss_global) - float(loss)) > 1e-4 * abs(float(loss))  # the groups matter


def forward_collectives(task, mesh, group_size):
  """Collectives of the compiled forward pass of teacher and student (train-mode batch norms,
  features and logits out) on `mesh`, the batch split over its devices."""
  state, teacher_vars = setup(task, mesh)

  def forward(state, teacher_vars, images):
    t_out = task.teacher.apply(teacher_vars, images, train=False)
    with layers.batch_norm_groups(group_size):
      s_out, _ = task.student.apply(
          {'params': state.params['student'], 'batch_stats': state.batch_stats['student']},
          images, train=True, mutable=['batch_stats'])
    return t_out, s_out

  images = sharding.global_batch(np.zeros((16, 8, 8, 3), np.float32), mesh)
  rep = sharding.replicated(mesh)
  compiled = jax.jit(forward, in_shardings=(rep, rep, sharding.batch_sharding(mesh))).lower(
      state, teacher_vars, images).compile()
  return collectives.summary(compiled)['total']['count']


def test_grouped_batch_norm_has_no_collective_in_the_forward_pass():
  """Groups that lie on one device: the forward pass (teacher, student with training batch
  norm) compiles to no collective at all on 8 devices; the global batch norm needs one per
  layer. (The whole step's count, one all-reduce against one per layer and pass, is
  test_bench's: the benchmark reports it from the very step the trainer runs.)"""
  mesh = mesh_of(8)
  task = tiny_task()
  n_bn = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(
      setup(task, mesh)[0].batch_stats['student']) if path[-1].key == 'mean')
  assert n_bn == 9  # resnet8: the stem, 2 per block, 2 downsampling shortcuts
  assert forward_collectives(task, mesh, GROUP) == 0
  assert forward_collectives(task, mesh, 0) >= n_bn


def test_grouped_batch_norm_trains_the_same_on_one_and_eight_devices():
  """Groups of 8 (the per-device batch of 64 examples on 8 devices), with the tolerances of the
  global batch norm's test. Why not smaller groups here: with this toy AFD task (weight 200)
  and groups of 2 or 4, perturbing the parameters by 1e-7 (relative) on ONE device already
  moves the second step's parameters beyond these tolerances, so such a comparison would
  measure the task's conditioning, not the sharding; with groups of 8 it does not."""
  rng = np.random.default_rng(0)
  batches = [toy_batch(rng, 64) for _ in range(3)]
  task = tiny_task(bn_group_size=8)
  test_step.assert_eight_devices_equal_one_device(task, batches)


def test_teacher_runs_at_its_own_dtype(batches):
  """config.teacher.dtype=bfloat16 under a float32 student: inside the jitted step the teacher's
  feature maps are bfloat16, the student's float32, and the loss terms float32."""
  config = base.get_base_config()
  config.teacher.name, config.student.name, config.afd.qk_dim = 'resnet14', 'resnet8', 16
  config.teacher.dtype, config.loss.kd_weight = 'bfloat16', 0.9
  task = task_lib.task_from_config(config, 4, 10, jnp.float32, (8, 8, 3))
  assert task.teacher.dtype == jnp.bfloat16 and task.student.dtype == jnp.float32
  mesh = mesh_of(8)
  state, teacher_vars = setup(task, mesh)
  dtypes = []
  with test_step.record_distiller_inputs(dtypes):
    _, metrics = jax.eval_shape(step.make_train_step(task), state, teacher_vars,
                                sharding.global_batch(batches[0], mesh))
  n_s, n_t = len(task.student.taps()), len(task.teacher.taps())
  assert dtypes == [[jnp.float32] * n_s + [jnp.bfloat16] * n_t]
  assert all(metrics[k].dtype == jnp.float32 for k in ('loss', 'ce', 'kd', 'afd'))


@pytest.mark.parametrize('key, value, message', [
    ('bn_group_size', 24, 'bn_group_size=24 must be 0 (the global batch) or a positive divisor '
                          'of batch_size=64'),
    ('bn_group_size', -1, 'bn_group_size=-1 must be 0'),
    ('teacher.dtype', 'float16', "teacher.dtype must be empty (= dtype) or one of float32, "
                                 "bfloat16, got 'float16'"),
])
def test_bad_group_size_or_teacher_dtype_is_refused_before_anything_runs(key, value, message):
  config = base.get_base_config()
  section, _, leaf = key.rpartition('.')
  (config[section] if section else config)[leaf] = value
  with pytest.raises(UserError, match=re.escape(message)):
    run_guard.validate(config)


def test_a_student_with_flax_batch_norm_is_refused_under_groups():
  """flax.linen.BatchNorm does not see the grouping; rather than train with a global batch
  norm that the config says is grouped, the step refuses, naming the module."""
  config = base.get_base_config()
  config.student.name, config.student.taps = 'tests.byo_models:tiny_convnet', 'auto'
  config.teacher.name, config.bn_group_size = 'resnet8', 2
  task = task_lib.task_from_config(config, 10, 10, jnp.float32, (8, 8, 1))
  with pytest.raises(ValueError, match=r'the student normalises with flax.linen.BatchNorm at '
                                       r'\S*BatchNorm_0'):
    task_lib.check_batch_norm_groups(task, (8, 8, 1))
  config.student.name, config.student.taps = 'resnet8', ''
  task_lib.check_batch_norm_groups(task_lib.task_from_config(config, 10, 10, jnp.float32, (8, 8, 1)),
                               (8, 8, 1))

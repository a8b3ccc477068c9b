"""The jitted, sharded train step: device-count invariance, one compilation, frozen teacher,
donated state, learning a toy task, KD + AFD stability, bfloat16 close to float32, and the eval
step's masking of padding. Tiny models on 8x8 images."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from afd_jax import models, optim, sharding, step
from afd_jax import task as task_lib
from afd_jax.distill import AFD


def opt_config(lr=0.05):
  c = ml_collections.ConfigDict()
  c.learning_rate, c.momentum, c.nesterov, c.weight_decay = lr, 0.9, False, 5e-4
  c.decay_bias_and_bn, c.schedule, c.decay_epochs, c.decay_factor, c.warmup_epochs = (
      True, 'constant', (), 0.1, 0.0)
  return c


def tiny_task(method='afd', kd_weight=0.9, lr=0.05, feature_weight=200.0, dtype=jnp.float32,
              bn_group_size=0):
  schedule = optax.constant_schedule(lr)
  distil = method == 'afd' or kd_weight > 0
  return task_lib.Task(
      student=models.create('resnet8', 4, dtype=dtype),
      teacher=models.create('resnet14', 4, dtype=dtype) if distil else None,
      distiller=AFD(qk_dim=16) if method == 'afd' else None, feature_name=method,
      tx=optim.make_optimizer(opt_config(lr), schedule), schedule=schedule,
      kd_weight=kd_weight, feature_weight=feature_weight if method == 'afd' else 0.0,
      bn_group_size=bn_group_size)


def mesh_of(n):
  return Mesh(np.asarray(jax.devices()[:n]).reshape(n, 1), (sharding.DATA, sharding.MODEL))


def toy_batch(rng, batch=16, size=8):
  """A learnable task: the class is the brightest image quadrant."""
  labels = rng.integers(0, 4, size=batch)
  images = 0.3 * rng.normal(size=(batch, size, size, 3))
  h = size // 2
  for i, c in enumerate(labels):
    r, col = divmod(int(c), 2)
    images[i, r * h:(r + 1) * h, col * h:(col + 1) * h] += 1.5
  return {'image': images.astype(np.float32), 'label': labels.astype(np.int32)}


def setup(task, mesh):
  teacher_vars = None
  if task.teacher is not None:
    teacher_vars = jax.jit(lambda k: task.teacher.init(k, jnp.zeros((2, 8, 8, 3)), train=False))(
        jax.random.PRNGKey(7))
  init = step.jit_init_state(task, mesh, (8, 8, 3),
                             jax.eval_shape(lambda: teacher_vars) if teacher_vars else None)
  state = init(jax.random.PRNGKey(0))
  rep = sharding.replicated(mesh)
  return state, (jax.device_put(teacher_vars, rep) if teacher_vars else None)


def run(task, mesh, batches, train_step=None):
  state, teacher_vars = setup(task, mesh)
  train_step = train_step or step.jit_train_step(task, mesh)
  history = []
  for b in batches:
    state, m = train_step(state, teacher_vars, sharding.global_batch(b, mesh))
    history.append(jax.device_get(m))
  return state, teacher_vars, history, train_step


@pytest.fixture(scope='module')
def batches():
  rng = np.random.default_rng(0)
  return [toy_batch(rng) for _ in range(3)]


@pytest.fixture(scope='module')
def afd8():
  """The KD + AFD task on 8 devices, its step compiled once for the whole module."""
  task, mesh = tiny_task(), mesh_of(8)
  return task, mesh, step.jit_train_step(task, mesh)


def assert_params_agree(params_a, params_b, start, moved_at_least=0.1):
  """Each parameter of two runs from `start` agrees to 1e-4 of how far the steps moved it
  (+1e-6 for leaves whose exact gradient is zero), and the steps did move the parameters."""
  max_diff = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())
  diff = jax.tree.map(max_diff, params_a, params_b)
  moved = jax.tree.map(max_diff, params_a, start)
  excess = jax.tree.map(lambda d, m: d - (1e-4 * m + 1e-6), diff, moved)
  worst = max(jax.tree_util.tree_leaves_with_path(excess), key=lambda kv: kv[1])
  assert worst[1] <= 0, (jax.tree_util.keystr(worst[0]), worst[1])
  assert max(jax.tree.leaves(moved)) > moved_at_least


def assert_eight_devices_equal_one_device(task, batches, train_step8=None):
  """Same steps on 1 and 8 devices. Only float32 summation order may differ (per-shard
  partial sums of the batch statistics and gradients), so each parameter must agree to 1e-4 of
  how far the steps moved it (+1e-6 for leaves whose exact gradient is zero, e.g. biases
  followed by batch norm). A real sharding bug (local instead of global batch statistics, a
  gradient or loss off by the device count) moves parameters by a sizeable fraction of that."""
  assert len(jax.devices()) == 8
  init, _ = setup(task, mesh_of(1))
  init = jax.device_get(init.params)
  s1, _, h1, _ = run(task, mesh_of(1), batches)
  s8, _, h8, _ = run(task, mesh_of(8), batches, train_step8)
  for a, b in zip(h1, h8):
    for k in ('loss', 'ce', 'kd', 'afd'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
  assert_params_agree(s1.params, s8.params, init)
  max_diff = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())
  # Running statistics (variances reach ~4 here): relative to their magnitude.
  rel = jax.tree.map(lambda a, b: max_diff(a, b) / max(float(np.abs(a).max()), 1.0),
                     s1.batch_stats, s8.batch_stats)
  assert max(jax.tree.leaves(rel)) <= 1e-5


def test_eight_devices_equal_one_device(batches, afd8):
  task, _, train_step8 = afd8
  assert_eight_devices_equal_one_device(task, batches, train_step8)


def test_compiles_once_teacher_frozen_student_and_meta_network_change(batches, afd8):
  task, mesh, train_step = afd8
  state0, teacher_vars = setup(task, mesh)
  before = jax.device_get((state0.params, teacher_vars))
  state = state0
  for b in batches * 2:
    state, _ = train_step(state, teacher_vars, sharding.global_batch(b, mesh))
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  # (The module shares this compiled step; other tests reuse it without retracing.)
  assert int(state.step) == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher_vars), before[1])
  for part in ('student', 'distiller'):
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                           state.params[part], before[0][part])
    assert all(jax.tree.leaves(changed)), part


def test_state_is_donated_teacher_is_not(batches, afd8):
  task, mesh, train_step = afd8
  state, teacher_vars = setup(task, mesh)
  new_state, _ = train_step(state, teacher_vars, sharding.global_batch(batches[0], mesh))
  assert jax.tree.leaves(state.params)[0].is_deleted()
  assert not jax.tree.leaves(teacher_vars)[0].is_deleted()
  assert not jax.tree.leaves(new_state.params)[0].is_deleted()


def test_student_learns_a_toy_task():
  rng = np.random.default_rng(1)
  task = tiny_task(method='none', kd_weight=0.0, lr=0.1)
  mesh = mesh_of(8)
  state, _ = setup(task, mesh)
  train_step = step.jit_train_step(task, mesh)
  for _ in range(60):
    state, _ = train_step(state, None, sharding.global_batch(toy_batch(rng, 32), mesh))
  test = toy_batch(np.random.default_rng(99), 256)
  test['mask'] = np.ones(256, np.float32)
  sums = jax.device_get(step.jit_eval_step(task.student, mesh)(
      {'params': state.params['student'], 'batch_stats': state.batch_stats['student']},
      sharding.global_batch(test, mesh)))
  assert sums['count'] == 256
  assert sums['correct1'] / 256 >= 0.9  # stated target: 90% after 60 steps (chance: 25%)


def test_kd_and_afd_run_50_steps_without_nan(afd8):
  task, mesh, train_step = afd8
  rng = np.random.default_rng(2)
  _, _, history, _ = run(task, mesh, [toy_batch(rng) for _ in range(50)], train_step)
  for m in history:
    for k in ('loss', 'ce', 'kd', 'afd', 'grad_norm'):
      assert np.isfinite(m[k]), k
  assert history[-1]['attention'].shape == (6, 3)
  np.testing.assert_allclose(history[-1]['attention'].sum(-1), 1.0, rtol=1e-5)
  assert history[-1]['loss'] < history[0]['loss']


def record_distiller_inputs(dtypes):
  """An interceptor: the dtypes of the feature maps (student's, then teacher's) handed to the AFD
  module in a train step, recorded whenever a step is traced."""

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, AFD) and context.method_name == '__call__' and kwargs.get('train'):
      dtypes.append([f.dtype for f in (*args[0], *args[1])])
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)


def test_bfloat16_step_runs_in_bfloat16_and_is_close_to_float32(batches, afd8):
  """dtype=bfloat16 really computes in bfloat16: the student's and teacher's feature maps inside
  the jitted step are bfloat16 (float32 in the float32 step), so every loss term differs from
  float32's, by bfloat16 rounding only; parameters and loss terms stay float32."""
  task, mesh, train_step = afd8
  s32, teacher32, h32, _ = run(task, mesh, batches[:1], train_step)
  task16 = tiny_task(dtype=jnp.bfloat16)
  state, teacher_vars = setup(task16, mesh)
  batch = sharding.global_batch(batches[0], mesh)
  dtypes16, dtypes32 = [], []
  with record_distiller_inputs(dtypes16):  # the real step, recorded while jit traces it
    s16, m16 = step.jit_train_step(task16, mesh)(state, teacher_vars, batch)
  with record_distiller_inputs(dtypes32):  # the float32 step, traced only
    jax.eval_shape(step.make_train_step(task), s32, teacher32, batch)
  n_feats = len(task.student.taps()) + len(task.teacher.taps())
  assert dtypes16 == [[jnp.bfloat16] * n_feats]
  assert dtypes32 == [[jnp.float32] * n_feats]
  h16 = jax.device_get(m16)
  for k in ('ce', 'kd', 'afd', 'loss'):
    assert h16[k].dtype == np.float32, k
    assert h16[k] != h32[0][k], k  # computed differently, not float32 under another name
    np.testing.assert_allclose(h16[k], h32[0][k], rtol=0.05)
  assert {x.dtype for x in jax.tree.leaves(s16.params)} == {np.dtype('float32')}
  assert not [x for x in jax.tree.leaves(s16) if x.dtype == jnp.bfloat16]


def test_eval_step_masks_padding():
  task = tiny_task(method='none', kd_weight=0.0)
  mesh = mesh_of(8)
  state, _ = setup(task, mesh)
  batch = toy_batch(np.random.default_rng(3), 16)
  batch['mask'] = np.asarray([1] * 11 + [0] * 5, np.float32)
  variables = {'params': state.params['student'], 'batch_stats': state.batch_stats['student']}
  sums = jax.device_get(step.jit_eval_step(task.student, mesh)(variables,
                                                                sharding.global_batch(batch, mesh)))
  logits, _ = task.student.apply(jax.device_get(variables), batch['image'], train=False)
  correct = np.asarray(np.argmax(logits, -1) == batch['label'])[:11].sum()
  assert sums['count'] == 11 and sums['correct1'] == correct

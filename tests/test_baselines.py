"""The baseline feature distillers (FitNet, AT, SP): losses worked out by hand and against
independent NumPy re-statements of their formulas, gradients against finite differences (float64),
zero loss where the method says so, SP over the global batch under jit on 8 devices, refusals,
default layers per model family, the CRD weights of the method configs, the benchmark harness,
and a method registered from outside afd_jax/distill/ as a config method. Their parity with
RepDistiller's own code: tests/test_parity_classic.py."""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import bench, distill, models, run_guard, sharding
from afd_jax import task as task_lib
from afd_jax.distill import AT, SP, FitNet
from afd_jax.errors import UserError
from configs import base, methods
from tests.test_step import mesh_of

EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# NumPy re-statements, written from the methods' formulas (channels-last maps, float64).

def np_pool(x, out_h, out_w):
  """PyTorch's AdaptiveAvgPool2d over axes 1 and 2 of `B x H x W x C`, by its definition."""
  _, h, w, _ = x.shape
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for i in range(out_h):
    r0, r1 = math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h)
    for j in range(out_w):
      c0, c1 = math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w)
      out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return out


def np_fitnet(s, t, params, relu=True):
  """Pool s to t's size, 1x1 conv, train-mode BN (biased batch variance), ReLU, MSE."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  s = np_pool(s, t.shape[1], t.shape[2])
  z = np.einsum('bhwc,cd->bhwd', s, np.asarray(params['conv']['kernel'])[0, 0])
  mean, var = z.mean((0, 1, 2)), z.var((0, 1, 2))
  y = (z - mean) / np.sqrt(var + EPS) * np.asarray(params['bn']['scale']) + np.asarray(params['bn']['bias'])
  if relu:
    y = np.maximum(y, 0)
  return np.mean((y - t) ** 2)


def np_attention(f):
  a = (f ** 2).mean(-1).reshape(f.shape[0], -1)
  return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def np_at(s_list, t_list, pairs):
  """Sum over pairs of mean((at(s) - at(t))**2); the larger map pooled to the smaller (CRD)."""
  total = 0.0
  for i, j in pairs:
    s, t = np.asarray(s_list[i], np.float64), np.asarray(t_list[j], np.float64)
    h, w = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
    total += np.mean((np_attention(np_pool(s, h, w)) - np_attention(np_pool(t, h, w))) ** 2)
  return total


def np_sp(s, t):
  def gram(f):
    x = np.asarray(f, np.float64).reshape(f.shape[0], -1)
    g = x @ x.T
    return g / np.linalg.norm(g, axis=1, keepdims=True)
  b = s.shape[0]
  return np.sum((gram(t) - gram(s)) ** 2) / b ** 2


def relu_features(rng, shape):
  """Post-ReLU-like maps (mostly positive, some exact zeros), float64."""
  return np.maximum(rng.normal(size=shape), 0) + 0.05 * np.abs(rng.normal(size=shape))


# ---------------------------------------------------------------------------------------------
# Jitted losses (one trace per shape set).

@jax.jit
def fitnet_loss(params, stats, s, t):
  (loss, _), _ = FitNet(0, 0).apply({'params': params, 'batch_stats': stats}, [s], [t],
                                    train=True, mutable=['batch_stats'])
  return loss


def at_loss(pairs):
  return jax.jit(lambda s, t: AT(pairs).apply({}, s, t, train=True)[0])


@jax.jit
def sp_loss(s, t):
  return SP().apply({}, [s], [t], train=True)[0]


def directional_check(loss_fn, np_fn, args, wrt, rng, h=1e-6, rtol=1e-6, trials=3):
  """`grad(loss_fn)` along random directions against central differences of `np_fn`.

  `wrt` indexes the arguments to differentiate (pytrees); gradients w.r.t. the others must be 0.
  """
  grads = jax.jit(jax.grad(loss_fn, argnums=tuple(range(len(args)))))(*args)
  for k, g in enumerate(grads):
    if k not in wrt:
      assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g)), \
          f'argument {k} (teacher features) must get no gradient'
  for _ in range(trials):
    dirs = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)), args[k]) for k in wrt]

    def shifted(sign):
      out = list(args)
      for k, d in zip(wrt, dirs):
        out[k] = jax.tree.map(lambda x, v: np.asarray(x) + sign * h * v, args[k], d)
      return out

    numeric = (np_fn(*shifted(1)) - np_fn(*shifted(-1))) / (2 * h)
    analytic = sum(float(np.sum(np.asarray(g) * v))
                   for k, d in zip(wrt, dirs)
                   for g, v in zip(jax.tree.leaves(grads[k]), jax.tree.leaves(d)))
    np.testing.assert_allclose(analytic, numeric, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# FitNet

def fitnet_params(rng, c_in, c_out):
  return {'conv': {'kernel': rng.normal(size=(1, 1, c_in, c_out)) / math.sqrt(c_in)},
          'bn': {'scale': 1.0 + 0.3 * rng.normal(size=c_out), 'bias': 0.3 * rng.normal(size=c_out)}}


def fitnet_stats(c):
  return {'bn': {'mean': np.zeros(c), 'var': np.ones(c)}}


@pytest.mark.parametrize('s_shape, t_shape', [((4, 4, 4, 3), (4, 4, 4, 5)),    # same size
                                              ((4, 6, 5, 3), (4, 3, 2, 5))])   # pooled, uneven
def test_fitnet_matches_numpy_and_finite_differences(s_shape, t_shape):
  rng = np.random.default_rng(0)
  s, t = relu_features(rng, s_shape), relu_features(rng, t_shape)
  params, stats = fitnet_params(rng, s_shape[-1], t_shape[-1]), fitnet_stats(t_shape[-1])
  with jax.enable_x64(True):
    as64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    params, stats, s, t = as64(params), as64(stats), jnp.asarray(s), jnp.asarray(t)
    np.testing.assert_allclose(float(fitnet_loss(params, stats, s, t)),
                               np_fitnet(s, t, params), rtol=1e-12)
    directional_check(lambda p, s_, t_: fitnet_loss(p, stats, s_, t_),
                      lambda p, s_, t_: np_fitnet(s_, t_, p), (params, s, t), (0, 1), rng)


def test_fitnet_is_zero_with_an_identity_regressor_and_updates_its_statistics():
  rng = np.random.default_rng(1)
  f = relu_features(rng, (4, 3, 3, 6))
  kernel = np.eye(6)[None, None]
  # Train mode: BN scale/bias that undo the batch normalisation make the regressor the identity.
  mean, var = f.mean((0, 1, 2)), f.var((0, 1, 2))
  params = {'conv': {'kernel': kernel}, 'bn': {'scale': np.sqrt(var + EPS), 'bias': mean}}
  with jax.enable_x64(True):
    variables = {'params': params, 'batch_stats': fitnet_stats(6)}
    (loss, _), updates = FitNet(0, 0).apply(variables, [jnp.asarray(f)], [jnp.asarray(f)],
                                            train=True, mutable=['batch_stats'])
    assert float(loss) < 1e-25
    n = f.size // 6  # running statistics: PyTorch's momentum 0.1 and unbiased variance
    np.testing.assert_allclose(updates['batch_stats']['bn']['mean'], 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(updates['batch_stats']['bn']['var'], 0.9 + 0.1 * var * n / (n - 1),
                               rtol=1e-12)
    # Eval mode: running mean 0, variance 1 - eps, unit scale, zero bias.
    eval_vars = {'params': {'conv': {'kernel': kernel}, 'bn': {'scale': np.ones(6), 'bias': np.zeros(6)}},
                 'batch_stats': {'bn': {'mean': np.zeros(6), 'var': np.full(6, 1 - EPS)}}}
    loss, _ = FitNet(0, 0).apply(eval_vars, [jnp.asarray(f)], [jnp.asarray(f)], train=False)
    assert float(loss) < 1e-25
    # Not zero when the hint differs.
    loss, _ = FitNet(0, 0).apply(eval_vars, [jnp.asarray(f)], [jnp.asarray(2 * f)], train=False)
    np.testing.assert_allclose(float(loss), np.mean(f ** 2), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# AT

def test_at_by_hand():
  # Pair 1, same size (1 x 1 x 2): energies mean_c(f**2) = [3, 4] (student, C = 2) and
  # [4, 3] (teacher, C = 1) -> maps [0.6, 0.8] and [0.8, 0.6] -> mean squared difference 0.04.
  s1 = np.array([[1.0, math.sqrt(5)], [2.0, 2.0]]).reshape(1, 1, 2, 2)
  t1 = np.array([2.0, math.sqrt(3)]).reshape(1, 1, 2, 1)
  # Pair 2, the 2 x 2 student map is pooled to the teacher's 1 x 2 *before* squaring (as CRD):
  # column means [sqrt(3), 2] -> energies [3, 4] -> 0.04 again (squaring first would give
  # energies [4, 5] and another loss).
  r3 = math.sqrt(3)
  s2 = np.array([[r3 - 1, 1.0], [r3 + 1, 3.0]]).reshape(1, 2, 2, 1)
  t2 = t1
  with jax.enable_x64(True):
    loss, per_pair = AT(((0, 0), (1, 1))).apply({}, [jnp.asarray(s1), jnp.asarray(s2)],
                                                [jnp.asarray(t1), jnp.asarray(t2)], train=True)
  np.testing.assert_allclose(np.asarray(per_pair), [0.04, 0.04], rtol=1e-12)
  np.testing.assert_allclose(float(loss), 0.08, rtol=1e-12)


AT_CASES = {
    # stage-final pairs, equal sizes, different channel counts
    'stages': ([(3, 8, 8, 4), (3, 4, 4, 8), (3, 2, 2, 16)],
               [(3, 8, 8, 6), (3, 4, 4, 12), (3, 2, 2, 24)], ((0, 0), (1, 1), (2, 2))),
    # student larger (uneven pooling), teacher larger, crossed pairs
    'pooling': ([(3, 7, 7, 4), (3, 2, 3, 5)], [(3, 4, 4, 6), (3, 5, 5, 2)], ((0, 0), (1, 1), (0, 1))),
}


@pytest.mark.parametrize('name', sorted(AT_CASES))
def test_at_matches_numpy_and_finite_differences(name):
  s_shapes, t_shapes, pairs = AT_CASES[name]
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    s = [jnp.asarray(relu_features(rng, x)) for x in s_shapes]
    t = [jnp.asarray(relu_features(rng, x)) for x in t_shapes]
    fn = at_loss(pairs)
    np.testing.assert_allclose(float(fn(s, t)), np_at(s, t, pairs), rtol=1e-12)
    directional_check(fn, lambda s_, t_: np_at(s_, t_, pairs), (s, t), (0,), rng)


def test_at_is_zero_for_identical_attention_maps():
  rng = np.random.default_rng(3)
  s = [relu_features(rng, (3, 4, 4, 5)), relu_features(rng, (3, 2, 2, 7))]
  # Teacher maps with other channels but the same attention map: channels permuted and
  # duplicated, and a positive per-sample scale (removed by the L2 normalisation).
  scale = np.array([2.0, 0.5, 3.0])[:, None, None, None]
  t = [scale * np.concatenate([f[..., ::-1], f], -1) for f in s]
  with jax.enable_x64(True):
    loss = at_loss(((0, 0), (1, 1)))([jnp.asarray(x) for x in s], [jnp.asarray(x) for x in t])
    assert abs(float(loss)) < 1e-28
    loss = at_loss(((0, 1),))([jnp.asarray(x) for x in s], [jnp.asarray(x) for x in t])
    assert float(loss) > 1e-3  # a 4x4 map against another tap's 2x2 map


# ---------------------------------------------------------------------------------------------
# SP

def test_sp_by_hand():
  # Student rows x1 = [1, 0], x2 = [1, 1]: G = [[1, 1], [1, 2]] -> rows [1, 1]/sqrt2, [1, 2]/sqrt5.
  # Teacher rows [1, 0], [0, 1]: G = I. Sum of squares: (2 - sqrt2) + (2 - 4/sqrt5); / B**2 = 4.
  s = np.array([[1.0, 0.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
  t = np.array([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 2, 1)  # other layout: only B matters
  with jax.enable_x64(True):
    loss = sp_loss(jnp.asarray(s), jnp.asarray(t))
  np.testing.assert_allclose(float(loss), 1 - math.sqrt(2) / 4 - 1 / math.sqrt(5), rtol=1e-12)


def test_sp_matches_numpy_and_finite_differences():
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    s = jnp.asarray(relu_features(rng, (5, 3, 3, 4)))
    t = jnp.asarray(relu_features(rng, (5, 2, 2, 6)))
    np.testing.assert_allclose(float(sp_loss(s, t)), np_sp(s, t), rtol=1e-12)
    directional_check(sp_loss, np_sp, (s, t), (0,), rng)


def test_sp_is_zero_for_identical_gram_structure():
  rng = np.random.default_rng(5)
  s = rng.normal(size=(6, 2, 2, 3))
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  # Same Gram matrix up to a global positive scale: rotate the flattened features and lay them
  # out as another map shape.
  t = (2.5 * s.reshape(6, 12) @ q).reshape(6, 3, 1, 4)
  with jax.enable_x64(True):
    assert abs(float(sp_loss(jnp.asarray(s), jnp.asarray(t)))) < 1e-28
    # A positive *per-sample* scale d scales G's columns too (G_t = D G_s D): rows stay
    # normalised but differ, so SP is not zero there (unlike AT).
    d = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])[:, None, None, None]
    assert float(sp_loss(jnp.asarray(s), jnp.asarray(d * s))) > 1e-3


def test_sp_uses_the_global_batch_under_jit_on_8_devices():
  rng = np.random.default_rng(6)
  s, t = rng.normal(size=(16, 2, 2, 3)).astype(np.float32), rng.normal(size=(16, 2, 2, 5)).astype(np.float32)
  mesh = mesh_of(8)
  fn = jax.jit(lambda a, b: SP().apply({}, [a], [b], train=True)[0],
               in_shardings=(sharding.batch_sharding(mesh),) * 2)
  np.testing.assert_allclose(float(fn(sharding.global_batch(s, mesh), sharding.global_batch(t, mesh))),
                             np_sp(s, t), rtol=1e-5)


@pytest.mark.parametrize('module', [FitNet(0, 0), AT(), SP()], ids=['fitnet', 'at', 'sp'])
def test_bad_features_get_a_clear_error(module):
  with pytest.raises(ValueError, match='different batch sizes'):
    module.init(jax.random.PRNGKey(0), [jnp.zeros((4, 2, 2, 3))], [jnp.zeros((2, 2, 2, 3))],
                train=False)
  with pytest.raises(ValueError, match='rank 4'):
    module.init(jax.random.PRNGKey(0), [jnp.zeros((4, 2, 3))], [jnp.zeros((4, 2, 2, 3))],
                train=False)


# ---------------------------------------------------------------------------------------------
# Layer choice from the model definitions (docs/method.md's tap tables; vgg: one tap per conv).

EXPECTED_TAPS = {
    # name: (number of taps, stage-final taps, FitNet's default tap)
    'wrn40x2': (18, [5, 11, 17], 11),      # 6 taps per stage
    'wrn16x2': (6, [1, 3, 5], 3),
    'resnet56': (27, [8, 17, 26], 17),     # 9 blocks per stage
    'resnet20': (9, [2, 5, 8], 5),
    'resnet110': (27, [8, 17, 26], 17),    # every second of 18 blocks per stage
    'resnet8x4': (3, [0, 1, 2], 1),
    'resnet18': (8, [1, 3, 5, 7], 3),      # 4 stages of 2: the middle is the lower one, stage 2
    'vgg13': (10, [1, 3, 5, 7, 9], 5),     # 5 blocks of 2 convs: stage 3 (CRD's block2)
    'vgg8': (5, [0, 1, 2, 3, 4], 2),
}


@pytest.mark.parametrize('name', sorted(EXPECTED_TAPS))
def test_default_layers_per_model_family(name):
  taps = models.create(name, 10).taps()
  count, final, hint = EXPECTED_TAPS[name]
  assert len(taps) == count
  assert models.stage_final(taps) == final
  assert distill.default_tap(taps) == hint
  config = methods.get_config('fitnet')
  fitnet = distill.create('fitnet', config, taps, taps)
  assert (fitnet.student_tap, fitnet.teacher_tap) == (hint, hint)
  assert distill.create('at', config, taps, taps).pairs == tuple(zip(final, final))
  sp = distill.create('sp', config, taps, taps)
  assert (sp.student_tap, sp.teacher_tap) == (count - 1, count - 1)


def test_layer_choice_across_families_and_from_the_config():
  wrn40, r20 = models.create('wrn40x2', 10).taps(), models.create('resnet20', 10).taps()
  r18 = models.create('resnet18', 10).taps()
  config = methods.get_config('fitnet')
  assert distill.create('at', config, r20, wrn40).pairs == ((2, 5), (5, 11), (8, 17))
  # resnet18 teacher (4 stages) -> resnet20 student (3): stages 1-3 only.
  assert distill.create('at', config, r20, r18).pairs == ((2, 1), (5, 3), (8, 5))
  f = distill.create('fitnet', config, r20, wrn40)
  assert (f.student_tap, f.teacher_tap) == (5, 11)
  config.fitnet.student_tap, config.fitnet.teacher_tap = 0, 17
  f = distill.create('fitnet', config, r20, wrn40)
  assert (f.student_tap, f.teacher_tap) == (0, 17)
  config.fitnet.teacher_tap = 18
  with pytest.raises(ValueError, match='fitnet.teacher_tap'):
    distill.create('fitnet', config, r20, wrn40)


def test_method_configs_state_crd_weights():
  expect = {'none': (1.0, 0.0, 0.0), 'kd': (0.1, 0.9, 0.0), 'fitnet': (1.0, 0.0, 100.0),
            'at': (1.0, 0.0, 1000.0), 'sp': (1.0, 0.0, 3000.0), 'afd': (1.0, 0.9, 200.0)}
  for arg, (ce, kd, feature) in expect.items():
    c = methods.get_config(arg)
    assert (c.loss.ce_weight, c.loss.kd_weight, c.loss.feature_weight) == (ce, kd, feature), arg
    assert c.loss.kd_temperature == 4.0 and c.method == ('none' if arg == 'kd' else arg)
  c = methods.get_config('sp+kd')
  assert (c.method, c.loss.kd_weight, c.loss.feature_weight) == ('sp', 0.9, 3000.0)
  assert 'none' not in distill.DEFAULT_FEATURE_WEIGHT and all(
      distill.DEFAULT_FEATURE_WEIGHT[m] == expect[m][2] for m in ('fitnet', 'at', 'sp', 'afd'))
  c.student.name, c.teacher.name = 'resnet8', 'resnet14'
  task = task_lib.task_from_config(c, 4, 10)
  assert isinstance(task.distiller, SP) and task.feature_name == 'sp'
  assert (task.ce_weight, task.kd_weight, task.feature_weight) == (1.0, 0.9, 3000.0)
  with pytest.raises(ValueError, match='Unknown method'):
    methods.get_config('crdd')


# ---------------------------------------------------------------------------------------------
# The benchmark (resnet14 -> resnet8, 8x8 images, batch 8). Every method's step on 8 devices:
# tests/test_methods.py.

BENCH_ARGS = ('--teacher', 'resnet14', '--student', 'resnet8', '--batch', '8', '--image-size', '8',
              '--num-classes', '4')


def test_benchmark_accepts_every_method(capsys):
  """The benchmark times methods beyond its default trio (test_bench: ce, kd, afd, at); every
  registered method builds through `bench.bench_config` and trains in test_methods."""
  assert bench.main(['--method', 'fitnet,sp', *BENCH_ARGS, '--steps', '2',
                     '--warmup', '1', '--rounds', '1', '--json']) == 0
  report = json.loads(capsys.readouterr().out)
  assert [r['method'] for r in report['results']] == ['fitnet', 'sp']
  for result in report['results']:
    assert result['steps_timed'] == 2 and np.isfinite(result['median_step_ms'])
  with pytest.raises(ValueError, match='Unknown method'):
    bench.bench_config('crdd', 'resnet14', 'resnet8')


@pytest.fixture
def registered_toy_method():
  """A method registered from outside afd_jax/distill/ (as a research fork's file would), and
  removed again so that the registry stays as the package made it."""

  class LastTapMSE(nn.Module):
    @nn.compact
    def __call__(self, student_features, teacher_features, train):
      s, t = student_features[-1], jax.lax.stop_gradient(teacher_features[-1])
      return jnp.mean(jnp.square(jnp.mean(s, -1) - jnp.mean(t, -1))), None

  method = distill.registry.register(distill.registry.Method(
      'toy_last_mse', build=lambda config, setting: LastTapMSE(), feature_weight=7.0,
      taps='the last tap of each model'))
  yield method
  distill.registry._METHODS.pop(method.name)  # pylint: disable=protected-access


def test_a_registered_method_is_a_config_method(registered_toy_method):
  """Registering is all a new method needs: config.method names it, the step builds it with
  its default weight through configs/methods.py's set_method, validation accepts it; a typo or
  a second registration of a name is refused, listing what exists."""
  assert 'toy_last_mse' in distill.registry.names()
  c = methods.set_method(base.get_base_config(), 'toy_last_mse')
  assert c.loss.feature_weight == 7.0 and (c.loss.ce_weight, c.loss.kd_weight) == (1.0, 0.0)
  c.student.name, c.teacher.name = 'resnet8', 'resnet14'
  run_guard.validate(c)
  task = task_lib.task_from_config(c, 4, 10)
  assert type(task.distiller).__name__ == 'LastTapMSE' and task.feature_name == 'toy_last_mse'
  with pytest.raises(ValueError, match='already registered'):
    distill.registry.register(registered_toy_method)
  c.method = 'toy_last_msee'
  with pytest.raises(UserError, match="Unknown method 'toy_last_msee'. Known methods: none, afd, "
                                      '.*toy_last_mse'):
    run_guard.validate(c)

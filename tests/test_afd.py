"""AFD against an independent NumPy re-statement of docs/method.md, on pairs and sizes that the
reference arrays do not cover (27 x 9 pairs, qk_dim 64, sizes that do not divide, up-sampling,
interleaved teacher shapes), in float64; gradients against finite differences; float32 against
float64; inference mode on the running statistics; adaptive pooling as PyTorch's; refusals."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax.distill import AFD
from afd_jax.distill.afd import per_tap_variables
from afd_jax.distill.pooling import adaptive_avg_pool2d, pool_matrix

EPS = 1e-5


def np_adaptive_pool(x, out_h, out_w):
  """PyTorch's AdaptiveAvgPool2d over the last two axes, by its definition, with loops."""
  h, w = x.shape[-2:]
  out = np.zeros(x.shape[:-2] + (out_h, out_w))
  for i in range(out_h):
    r0, r1 = math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h)
    for j in range(out_w):
      c0, c1 = math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w)
      out[..., i, j] = x[..., r0:r1, c0:c1].mean(axis=(-2, -1))
  return out


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_linear_bn(x, p, relu):
  z = x @ p['linear']['kernel'] + p['linear']['bias']
  mean, var = z.mean(0), z.var(0)
  y = (z - mean) / np.sqrt(var + EPS) * p['bn']['scale'] + p['bn']['bias']
  return np.maximum(y, 0) if relu else y


def np_afd(student, teacher, params, d):
  """L_AFD and attention, in train mode, written from the spec."""
  student = [np.asarray(f, np.float64) for f in student]
  teacher = [np.asarray(f, np.float64) for f in teacher]
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), per_tap_variables(params))
  b, t, s = student[0].shape[0], len(teacher), len(student)
  q = np.stack([np_linear_bn(f.mean((1, 2)), params[f'query_{n}'], False)
                for n, f in enumerate(teacher)], 1)
  k = np.stack([np_linear_bn(f.mean((1, 2)), params[f'key_{m}'], True)
                for m, f in enumerate(student)], 1)
  kb = np_linear_bn(k.reshape(b * s, d), params['bilinear'], False).reshape(b, s, t, d)
  e = np.zeros((b, t, s))
  for n in range(t):
    for m in range(s):
      e[:, n, m] = ((kb[:, m, n, :] * q[:, n, :]).sum(-1) +
                    params['p_t'][n] @ params['p_s'][m]) / math.sqrt(d)
  alpha = np.exp(e - e.max(-1, keepdims=True))
  alpha /= alpha.sum(-1, keepdims=True)
  loss = 0.0
  for n, ht in enumerate(teacher):
    _, h, w, _ = ht.shape
    vt = np_normalize((ht ** 2).mean(-1).reshape(b, -1))
    dist = np.zeros((b, s))
    for m, hs in enumerate(student):
      vs = np_normalize(np_adaptive_pool((hs ** 2).mean(-1), h, w).reshape(b, -1))
      dist[:, m] = ((vs - vt) ** 2).mean(-1)
    loss += (alpha[:, n] * dist).sum(-1).mean()
  return loss, alpha


def features(rng, shapes, batch):
  return [jnp.asarray(np.maximum(rng.normal(size=(batch,) + s), 0) + 0.05 * rng.normal(size=(batch,) + s))
          for s in shapes]


def nontrivial(params, rng):
  """Random batch-norm scales/biases, so that no term is the identity."""
  def f(path, x):
    name = path[-1].key
    if name == 'scale':
      return x + 0.3 * rng.normal(size=x.shape)
    if name == 'bias':
      return x + 0.2 * rng.normal(size=x.shape)
    return x
  return jax.tree_util.tree_map_with_path(f, params)


CASES = {
    # resnet110 teacher (27 taps, every second block) -> resnet20 student (9 taps), qk_dim 64;
    # spatial sizes scaled down (8/4/2) to keep the test fast.
    '27x9_qk64': ([(8, 8, 16)] * 9 + [(4, 4, 32)] * 9 + [(2, 2, 64)] * 9,
                  [(8, 8, 16)] * 3 + [(4, 4, 32)] * 3 + [(2, 2, 64)] * 3, 64),
    # sizes that do not divide (an odd input through strided stages) and up-sampling.
    'uneven_and_upsampling': ([(7, 7, 8), (7, 7, 8), (4, 4, 16), (2, 2, 32)],
                              [(6, 5, 4), (3, 3, 8), (1, 1, 16)], 16),
    # teacher shapes interleaved, so the per-shape groups are not contiguous.
    'interleaved': ([(4, 4, 8), (2, 2, 8), (4, 4, 8), (3, 3, 4)],
                    [(4, 4, 6), (2, 2, 6)], 8),
}


@pytest.fixture(scope='module', params=sorted(CASES))
def case(request):
  t_shapes, s_shapes, d = CASES[request.param]
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    student = [f.astype(jnp.float64) for f in features(rng, s_shapes, 6)]
    teacher = [f.astype(jnp.float64) for f in features(rng, t_shapes, 6)]
    variables = jax.jit(AFD(d).init, static_argnames='train')(jax.random.PRNGKey(1), student,
                                                              teacher, train=False)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                          nontrivial(variables['params'], rng))
    stats = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables['batch_stats'])
  return student, teacher, params, stats, d


@jax.jit
def afd_loss(params, stats, student, teacher):
  (loss, attention), _ = AFD(params['p_t'].shape[1]).apply({'params': params, 'batch_stats': stats}, student,
                                      teacher, train=True, mutable=['batch_stats'])
  return loss, attention


def test_loss_and_attention_match_numpy(case):
  student, teacher, params, stats, d = case
  with jax.enable_x64(True):
    loss, attention = afd_loss(params, stats, student, teacher)
  ref_loss, ref_alpha = np_afd(student, teacher, params, d)
  assert attention.shape == (student[0].shape[0], len(teacher), len(student))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-10)
  np.testing.assert_allclose(np.asarray(attention), ref_alpha, rtol=1e-10, atol=1e-12)


def test_gradients_match_finite_differences(case):
  student, teacher, params, stats, d = case
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    grad_p, grad_s, grad_t = jax.jit(jax.grad(lambda p, s, t: afd_loss(p, stats, s, t)[0],
                                              argnums=(0, 1, 2)))(params, student, teacher)
    grad_p, grad_s = jax.tree.map(np.asarray, (grad_p, grad_s))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grad_t), 'teacher features are constants'
  for _ in range(3):
    dir_p = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
    dir_s = [rng.normal(size=f.shape) for f in student]
    h = 1e-6
    shift = lambda sign: (jax.tree.map(lambda x, v: np.asarray(x) + sign * h * v, params, dir_p),
                          [np.asarray(f) + sign * h * v for f, v in zip(student, dir_s)])
    (p_plus, s_plus), (p_minus, s_minus) = shift(1), shift(-1)
    numeric = (np_afd(s_plus, teacher, p_plus, d)[0] - np_afd(s_minus, teacher, p_minus, d)[0]) / (2 * h)
    analytic = (sum(float(np.sum(np.asarray(g) * v)) for g, v in
                    zip(jax.tree.leaves(grad_p), jax.tree.leaves(dir_p))) +
                sum(float(np.sum(np.asarray(g) * v)) for g, v in zip(grad_s, dir_s)))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


def test_float32_matches_float64(case):
  student, teacher, params, stats, d = case
  with jax.enable_x64(True):
    loss64, att64 = afd_loss(params, stats, student, teacher)
  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  loss32, att32 = afd_loss(f32(params), f32(stats), f32(student), f32(teacher))
  assert loss32.dtype == jnp.float32
  np.testing.assert_allclose(float(loss32), float(loss64), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(att32), np.asarray(att64), atol=1e-5)


def test_eval_mode_uses_running_statistics_and_updates_nothing():
  rng = np.random.default_rng(3)
  student, teacher = features(rng, [(4, 4, 8)] * 2, 4), features(rng, [(4, 4, 8)] * 3, 4)
  module = AFD(16)
  variables = jax.jit(module.init, static_argnames='train')(jax.random.PRNGKey(0), student,
                                                            teacher, train=False)
  apply = jax.jit(module.apply, static_argnames=('train', 'mutable'))
  (_, att_train), updates = apply(variables, student, teacher, train=True,
                                  mutable=('batch_stats',))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))
  _, att_a = apply(variables, student, teacher, train=False)
  _, att_b = apply({**variables, 'batch_stats': updates['batch_stats']}, student, teacher,
                   train=False)
  assert not np.allclose(att_a, att_b)  # eval attention depends on the running statistics
  assert att_train.shape == att_a.shape == (4, 3, 2)


def test_pool_matrix_is_pytorch_adaptive_pooling():
  rng = np.random.default_rng(4)
  for (h_in, w_in), (h_out, w_out) in [((32, 32), (8, 8)), ((7, 5), (3, 2)), ((2, 3), (7, 7)),
                                       ((6, 6), (4, 4)), ((5, 5), (5, 5)), ((1, 1), (3, 3))]:
    x = rng.normal(size=(2, 3, h_in, w_in))
    with jax.enable_x64(True):
      ours = np.asarray(adaptive_avg_pool2d(jnp.asarray(x), (h_out, w_out)))
    np.testing.assert_allclose(ours, np_adaptive_pool(x, h_out, w_out), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(pool_matrix(7, 3).sum(1), 1.0)


@pytest.mark.parametrize('student, teacher, message', [
    ([jnp.zeros((4, 4, 4, 8))], [jnp.zeros((2, 4, 4, 8))], 'different batch sizes'),
    ([jnp.zeros((4, 4, 4, 8)), jnp.zeros((3, 2, 2, 8))], [jnp.zeros((4, 4, 4, 8))],
     'different batch sizes'),
    ([jnp.zeros((4, 16, 8))], [jnp.zeros((4, 4, 4, 8))], 'rank 4'),
    ([], [jnp.zeros((4, 4, 4, 8))], 'non-empty'),
])
def test_bad_features_get_a_clear_error(student, teacher, message):
  with pytest.raises(ValueError, match=message):
    AFD(8).init(jax.random.PRNGKey(0), student, teacher, train=False)

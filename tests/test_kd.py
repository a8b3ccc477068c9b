"""Cross-entropy and Hinton KD against their formulas (and PyTorch's, where torch is present)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax.distill import cross_entropy, kd_loss


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kd_matches_its_formula_and_has_no_teacher_gradient():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
  temp = 4.0
  p_t = np.exp(np_log_softmax(t / temp))
  expected = temp ** 2 * np.sum(p_t * (np.log(p_t) - np_log_softmax(s / temp))) / 5
  np.testing.assert_allclose(kd_loss(jnp.asarray(s), jnp.asarray(t), temp), expected, rtol=1e-5)
  assert float(kd_loss(jnp.asarray(t), jnp.asarray(t), temp)) == pytest.approx(0.0, abs=1e-5)
  grad_t = jax.grad(lambda t: kd_loss(jnp.asarray(s), t, temp))(jnp.asarray(t))
  assert float(jnp.abs(grad_t).max()) == 0.0


def test_kd_matches_pytorch_kl_div():
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(6, 10)).astype(np.float32), rng.normal(size=(6, 10)).astype(np.float32)
  f = torch.nn.functional
  expected = f.kl_div(f.log_softmax(torch.from_numpy(s) / 4, 1), f.softmax(torch.from_numpy(t) / 4, 1),
                      reduction='sum') * 16 / 6
  np.testing.assert_allclose(kd_loss(jnp.asarray(s), jnp.asarray(t), 4.0), expected.item(),
                             rtol=1e-5)


def test_cross_entropy_and_masking():
  rng = np.random.default_rng(2)
  logits, labels = rng.normal(size=(4, 3)), np.array([0, 2, 1, 2])
  nll = -np_log_softmax(logits)[np.arange(4), labels]
  np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), nll.mean(),
                             rtol=1e-5)
  mask = jnp.asarray([1, 0, 1, 0])
  np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask),
                             nll[[0, 2]].mean(), rtol=1e-5)

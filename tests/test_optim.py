"""SGD as torch.optim.SGD (weight decay before momentum, Nesterov) and the epoch schedules."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from afd_jax import optim
from afd_jax.errors import UserError


def opt(**overrides):
  c = ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, decay_bias_and_bn=True,
      schedule='step', decay_epochs=(3, 5), decay_factor=0.1, warmup_epochs=0.0))
  c.update(overrides)
  return c


def torch_sgd(params, grads_seq, lr, momentum, wd, nesterov, decay_mask):
  """torch.optim.SGD's update rule (dampening 0), written out."""
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  buf = {}
  for step, grads in enumerate(grads_seq):
    for k in params:
      d = grads[k] + (wd * params[k] if decay_mask[k] else 0)
      buf[k] = d if step == 0 else momentum * buf[k] + d
      params[k] = params[k] - lr(step) * ((d + momentum * buf[k]) if nesterov else buf[k])
  return params


@pytest.mark.parametrize('nesterov, decay_all', [(False, True), (True, False)])
def test_sgd_matches_pytorch(nesterov, decay_all):
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=(4,))}
  grads_seq = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(6)]
  c = opt(nesterov=nesterov, decay_bias_and_bn=decay_all)
  schedule = optim.learning_rate_schedule(c, steps_per_epoch=1, num_epochs=6)
  tx = optim.make_optimizer(c, schedule)
  p = {k: jnp.asarray(v) for k, v in params.items()}
  state = tx.init(p)
  for g in grads_seq:
    updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
    p = optax.apply_updates(p, updates)
  expected = torch_sgd(params, grads_seq, lambda s: float(schedule(s)), 0.9, 5e-4, nesterov,
                       {'kernel': True, 'bias': decay_all})
  for k in params:
    np.testing.assert_allclose(p[k], expected[k], rtol=1e-5, atol=1e-6)


def test_schedules():
  step = optim.learning_rate_schedule(opt(), steps_per_epoch=10, num_epochs=6)
  assert [float(step(s)) for s in (0, 19, 20, 39, 40)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001])  # 1-based epochs 3 and 5 start at steps 20 and 40
  warm = optim.learning_rate_schedule(opt(warmup_epochs=1.0), steps_per_epoch=10, num_epochs=6)
  assert [float(warm(s)) for s in (0, 5, 10, 25)] == pytest.approx([0.0, 0.05, 0.1, 0.01])
  cosine = optim.learning_rate_schedule(opt(schedule='cosine'), steps_per_epoch=10, num_epochs=6)
  assert [float(cosine(s)) for s in (0, 30, 60)] == pytest.approx([0.1, 0.05, 0.0], abs=1e-7)
  with pytest.raises(UserError, match='step, cosine or constant'):
    optim.learning_rate_schedule(opt(schedule='linear'), 10, 6)

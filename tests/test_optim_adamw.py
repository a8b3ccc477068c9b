"""AdamW as torch.optim.AdamW with timm's no-decay groups; clipping, warm-up from a start value,
the cosine floor, batch-scaled learning rates, and the one-line refusals. SGD at the defaults."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from afd_jax import bench, optim
from afd_jax.errors import UserError
from configs import base


def opt(**overrides):
  c = base.get_base_config().optimizer
  c.update(overrides)
  return c


def vit_like_params():
  """A tiny ViT's tree: kernels, 1-d biases and norms, a 2-d Flax bias, tokens, positions."""
  shapes = {'patch_embed': {'kernel': (4, 4, 3, 8), 'bias': (8,)}, 'cls_token': (1, 1, 8),
            'dist_token': (1, 1, 8), 'pos_embed': (1, 5, 8),
            'blocks_0': {'norm1': {'scale': (8,), 'bias': (8,)},
                         'attn': {'qkv': {'kernel': (8, 24), 'bias': (24,)},
                                  'query': {'kernel': (8, 2, 4), 'bias': (2, 4)}}},
            'head': {'kernel': (8, 10), 'bias': (10,)}}
  return jax.tree.map(lambda s: jnp.ones(s), shapes, is_leaf=lambda s: isinstance(s, tuple))


DECAYED = {'patch_embed/kernel', 'blocks_0/attn/qkv/kernel', 'blocks_0/attn/query/kernel',
           'head/kernel'}


def names(tree):
  return {'/'.join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_adamw_decays_only_timm_groups():
  params = vit_like_params()
  mask = names(optim.adamw_decay_mask(params))
  assert {k for k, decays in mask.items() if decays} == DECAYED and len(mask) == 13
  # Zero gradients: Adam's step is 0, so only the decoupled decay moves (by lr * wd).
  tx = optim.make_optimizer(opt(name='adamw', weight_decay=0.5), optax.constant_schedule(0.1))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for k, u in names(updates).items():
    np.testing.assert_allclose(u, -0.05 if k in DECAYED else 0.0, rtol=1e-6)


def loss_fn(p, x, t):
  y = (x @ p['fc']['kernel'] + p['fc']['bias'] + p['pos_embed'][0, 0]) * p['norm']['scale']
  return ((y - t) ** 2).mean() + 0.1 * (p['pos_embed'] ** 2).sum()


def test_adamw_matches_pytorch():
  torch = pytest.importorskip('torch', reason='torch (CPU) is the reference AdamW')
  rng = np.random.default_rng(0)
  init = {'fc': {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=(4,))},
          'pos_embed': rng.normal(size=(1, 2, 4)), 'norm': {'scale': 1 + rng.normal(size=(4,))}}
  x, t = rng.normal(size=(16, 3)), rng.normal(size=(16, 4))
  c = opt(name='adamw', weight_decay=0.3, b1=0.8, b2=0.95, eps=1e-6, clip_grad_norm=0.5,
          schedule='cosine', learning_rate=0.05, warmup_epochs=2, warmup_init_lr=1e-3,
          min_learning_rate=1e-3)
  schedule = optim.learning_rate_schedule(c, steps_per_epoch=1, num_epochs=8)
  tx = optim.make_optimizer(c, schedule)
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), init)
  state = tx.init(p)
  for _ in range(8):
    grads = jax.grad(loss_fn)(p, jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  tp = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in names(init).items()}
  decay = [tp['fc/kernel']]
  rest = [v for k, v in tp.items() if k != 'fc/kernel']
  ref = torch.optim.AdamW([{'params': decay}, {'params': rest, 'weight_decay': 0.0}], lr=0.05,
                          betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3)
  nested = {'fc': {'kernel': tp['fc/kernel'], 'bias': tp['fc/bias']},
            'pos_embed': tp['pos_embed'], 'norm': {'scale': tp['norm/scale']}}
  tx_, tt = torch.tensor(x, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
  for s in range(8):
    for group in ref.param_groups:
      group['lr'] = float(schedule(s))
    ref.zero_grad()
    loss_fn(nested, tx_, tt).backward()
    torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.5)
    ref.step()
  for k, v in names(p).items():
    expected = tp[k].detach().numpy()
    assert np.abs(expected - names(init)[k]).max() > 1e-3  # it moved
    np.testing.assert_allclose(v, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_schedule_warmup_start_and_cosine_floor():
  c = opt(schedule='cosine', learning_rate=5e-4, warmup_epochs=2, warmup_init_lr=1e-6,
          min_learning_rate=1e-5)
  lr = optim.learning_rate_schedule(c, steps_per_epoch=10, num_epochs=10)
  assert [float(lr(s)) for s in (0, 10, 20, 60, 100, 150)] == pytest.approx(
      [1e-6, (1e-6 + 5e-4) / 2, 5e-4, (5e-4 + 1e-5) / 2, 1e-5, 1e-5], rel=1e-5)


def test_lr_scales_with_the_batch():
  c = opt(schedule='constant', learning_rate=5e-4, lr_batch_scale=512)
  assert float(optim.learning_rate_schedule(c, 10, 1, batch_size=1024)(3)) == pytest.approx(1e-3)
  assert float(optim.learning_rate_schedule(c, 10, 1, batch_size=128)(3)) == pytest.approx(1.25e-4)
  with pytest.raises(ValueError, match='batch size'):
    optim.learning_rate_schedule(c, 10, 1)


def test_clip_by_global_norm_first():
  c = opt(momentum=0.0, weight_decay=0.0, clip_grad_norm=1.0)
  tx = optim.make_optimizer(c, optax.constant_schedule(1.0))
  params = {'a': jnp.zeros(2)}
  for g, expected in (([3.0, 4.0], [-0.6, -0.8]), ([0.3, 0.4], [-0.3, -0.4])):
    updates, _ = tx.update({'a': jnp.asarray(g)}, tx.init(params), params)
    np.testing.assert_allclose(updates['a'], expected, rtol=1e-6)


def legacy_sgd(c, schedule):
  """The SGD chain as it was before the optimizer options, for the bit-for-bit check."""
  decay = optax.add_decayed_weights(
      c.weight_decay, mask=lambda p: optim.decay_mask(p, c.decay_bias_and_bn))
  return optax.chain(decay, optax.sgd(schedule, momentum=c.momentum, nesterov=c.nesterov))


@pytest.mark.parametrize('source', ['base', 'bench'])
def test_sgd_defaults_unchanged_bit_for_bit(source):
  c = opt() if source == 'base' else bench.bench_config('ce', 'resnet32x4', 'resnet8x4').optimizer
  schedule = optim.learning_rate_schedule(c, steps_per_epoch=2, num_epochs=240, batch_size=64)
  tx, old = optim.make_optimizer(c, schedule), legacy_sgd(c, schedule)
  params = vit_like_params()
  state, old_state = tx.init(params), old.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(old_state)
  p, q = params, params
  for step in range(3):
    updates, state = tx.update(jax.tree.map(lambda a: a + 0.1 * step, p), state, p)
    old_updates, old_state = old.update(jax.tree.map(lambda a: a + 0.1 * step, q), old_state, q)
    p, q = optax.apply_updates(p, updates), optax.apply_updates(q, old_updates)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), p, q)))
  assert float(schedule(297)) == np.float32(0.05) and float(schedule(298)) == pytest.approx(0.005, rel=1e-6)


@pytest.mark.parametrize('overrides, words', [
    (dict(name='lamb'), "optimizer.name must be one of sgd, adamw, got 'lamb'"),
    (dict(clip_grad_norm=-1.0), 'optimizer.clip_grad_norm must be >= 0'),
    (dict(lr_batch_scale=-512), 'optimizer.lr_batch_scale must be >= 0'),
    (dict(min_learning_rate=-1e-5), 'optimizer.min_learning_rate must be >= 0'),
    (dict(name='adamw', b2=1.0), 'adamw needs 0 <= optimizer.b1, b2 < 1')])
def test_bad_settings_refused_in_one_line(overrides, words):
  c = opt(**overrides)
  for call in (lambda: optim.check(c), lambda: optim.learning_rate_schedule(c, 10, 1, 64),
               lambda: optim.make_optimizer(c, optax.constant_schedule(0.1))):
    with pytest.raises(UserError) as raised:
      call()
    assert words in str(raised.value) and '\n' not in str(raised.value)

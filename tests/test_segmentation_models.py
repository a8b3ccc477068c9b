"""Segmentation models (afd_jax/models/segmentation.py): per-pixel logits at the input's size
for CNN backbones under FPN and a ViT under progressive upsampling, at sizes the backbone's
strides do not divide; `taps()` names every returned map; the head learns a per-pixel task;
the refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from afd_jax import models
from afd_jax.distill import dense
from afd_jax.models.segmentation import Segmenter


def shapes(model, size):
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  logits, taps = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  return logits.shape, [t.shape for t in taps]


@pytest.mark.parametrize('backbone, head, size, levels', [
    ('resnet8', 'fpn', 30, [(30, 64), (15, 64), (8, 64)]),
    ('resnet18im', 'fpn', 72, [(18, 64), (9, 64), (5, 64), (3, 64)]),
    ('vit_micro4', 'progressive', 28, [(14, 64), (28, 64)]),
])
def test_logits_at_the_input_size_and_taps_for_every_map(backbone, head, size, levels):
  model = Segmenter(models.create(backbone, 1), num_classes=7, head=head)
  logits, taps = shapes(model, size)
  assert logits == (2, size, size, 7)
  names = [t.name for t in model.taps()]
  backbone_taps = models.create(backbone, 1).taps()
  assert names[:len(backbone_taps)] == [t.name for t in backbone_taps]
  assert len(names) == len(taps) == len(backbone_taps) + len(levels)
  assert [(s[1], s[3]) for s in taps[len(backbone_taps):]] == levels
  prefix = 'head.p' if head == 'fpn' else 'head.up'
  assert all(n.startswith(prefix) for n in names[len(backbone_taps):])
  stages = [t.stage for t in model.taps()]
  assert stages == sorted(stages)  # the head's levels come after the backbone's stages


def test_the_fpn_head_learns_a_per_pixel_task():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  labels = (images[..., 0] > 0).astype(np.int32) + 2 * (images[..., 1] > 0.5)  # 4 classes
  labels[:, :2] = dense.IGNORE_INDEX
  model = Segmenter(models.create('resnet8', 1), num_classes=4, width=16)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  params, stats = variables['params'], variables['batch_stats']
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  @jax.jit
  def train_step(params, stats, opt_state):
    def loss_fn(p):
      (logits, _), _ = model.apply({'params': p, 'batch_stats': stats}, images, train=True,
                                   mutable=['batch_stats'])
      return dense.pixel_cross_entropy(logits, jnp.asarray(labels))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(30):
    params, opt_state, loss = train_step(params, stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


def test_refusals():
  with pytest.raises(ValueError, match='head must be one of'):
    Segmenter(models.create('resnet8', 1), 3, head='unet').taps()
  with pytest.raises(ValueError, match='needs `upsamplings`'):
    Segmenter(models.create('resnet8', 1), 3, head='progressive').taps()
  assert len(Segmenter(models.create('resnet8', 1), 3, head='progressive',
                       upsamplings=2).taps()) == 3 + 2

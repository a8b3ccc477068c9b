"""Segmentation models (afd_jax/models/segmentation.py): per-pixel logits at the input's size
for CNN backbones under FPN and a ViT under progressive upsampling, at sizes the backbone's
strides do not divide; `taps()` names every returned map; the refusals. (That the head learns:
the teacher run of tests/test_segmentation_train.py.)"""
import jax
import jax.numpy as jnp
import pytest

from afd_jax import models
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


def test_refusals():
  with pytest.raises(ValueError, match='head must be one of'):
    Segmenter(models.create('resnet8', 1), 3, head='unet').taps()
  with pytest.raises(ValueError, match='needs `upsamplings`'):
    Segmenter(models.create('resnet8', 1), 3, head='progressive').taps()
  assert len(Segmenter(models.create('resnet8', 1), 3, head='progressive',
                       upsamplings=2).taps()) == 3 + 2

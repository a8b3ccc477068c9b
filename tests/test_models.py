"""The model zoo: names, tap counts and shapes (docs/method.md), parameter counts (PyTorch's),
any input size and channel count, batch norm as PyTorch's, bfloat16 activations, refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import models

# Parameter counts of the PyTorch models with 100 classes: sum(p.numel() for p in
# model.parameters()) for the official AFD code (github.com/clovaai/attention-feature-distillation,
# commit dd990d0, models/{resnet,resnetv2,resnet_im,wrn}.py) and, for vgg8/vgg13, the CRD
# benchmark's models/vgg.py (vgg8_bn, vgg13_bn; github.com/HobbitLong/RepDistiller).
TORCH_PARAMETER_COUNTS = {
    'resnet8': 83892, 'resnet14': 181108, 'resnet20': 278324, 'resnet32': 472756,
    'resnet44': 667188, 'resnet56': 861620, 'resnet110': 1736564, 'resnet8x4': 1233540,
    'resnet32x4': 7433860, 'wrn16x1': 180916, 'wrn16x2': 703284, 'wrn28x1': 375348,
    'wrn28x2': 1479220, 'wrn40x1': 569780, 'wrn40x2': 2255156, 'resnet18': 11220132,
    'resnet34': 21328292, 'resnet18im': 11227812, 'resnet34im': 21335972,
    'resnet50im': 23712932, 'vgg8': 3965028, 'vgg13': 9462180,
    # ViTs, timm's layout with 100 classes: timm's vit_{tiny,small,base}_patch16_224 have
    # 5,717,416 / 22,050,664 / 86,567,656 parameters with 1000 (the head is dim x classes +
    # classes); vit_mini4 by the same count (patch 4, dim 192, depth 6, MLP 384, 8x8 grid).
    'vit_ti16': 5543716, 'vit_s16': 21704164, 'vit_b16': 85875556, 'vit_mini4': 1823908,
    # timm's vit_large_patch16_224 / vit_huge_patch14_224: 304,326,632 / 632,045,800 with 1000.
    'vit_l16': 303404132, 'vit_h14': 630892900,
    # DeiTs: timm's deit_{tiny,small,base}_distilled_patch16_224 have 5,910,800 / 22,436,432 /
    # 87,338,192 with 1000 (two heads); deit_mini4 by the same count.
    'deit_ti16': 5563400, 'deit_s16': 21743432, 'deit_b16': 85953992, 'deit_mini4': 1843592,
    # micro4: patch 4, dim 64, depth 4, MLP 128, a 7x7 grid (28x28), by the same count.
    'vit_micro4': 146916, 'deit_micro4': 153544,
}


def stage(count, c, h):
  return [(h, h, c)] * count


# Taps at 32x32 (224x224 for the *im models), channels-last, from docs/method.md's table.
EXPECTED_TAPS = {
    **{f'resnet{d}': stage(n, 16, 32) + stage(n, 32, 16) + stage(n, 64, 8)
       for d, n in [(8, 1), (14, 2), (20, 3), (32, 5), (44, 7), (56, 9)]},
    'resnet110': stage(9, 16, 32) + stage(9, 32, 16) + stage(9, 64, 8),  # blocks 2, 4, ..., 54
    'resnet8x4': stage(1, 64, 32) + stage(1, 128, 16) + stage(1, 256, 8),
    'resnet32x4': stage(5, 64, 32) + stage(5, 128, 16) + stage(5, 256, 8),
    **{f'wrn{6 * n + 4}x{w}': stage(n, 16 * w, 32) + stage(n, 32 * w, 16) + stage(n, 64 * w, 8)
       for n in (2, 4, 6) for w in (1, 2)},
    'resnet18': stage(2, 64, 32) + stage(2, 128, 16) + stage(2, 256, 8) + stage(2, 512, 4),
    'resnet34': stage(3, 64, 32) + stage(4, 128, 16) + stage(6, 256, 8) + stage(3, 512, 4),
    'resnet18im': stage(2, 64, 56) + stage(2, 128, 28) + stage(2, 256, 14) + stage(2, 512, 7),
    'resnet34im': stage(3, 64, 56) + stage(4, 128, 28) + stage(6, 256, 14) + stage(3, 512, 7),
    'resnet50im': stage(3, 256, 56) + stage(4, 512, 28) + stage(6, 1024, 14) + stage(3, 2048, 7),
    'vgg8': [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)],
    'vgg13': stage(2, 64, 32) + stage(2, 128, 16) + stage(2, 256, 8) + stage(4, 512, 4),
    # ViTs at 32x32: every block's patch tokens as a grid (2x2 for 16-pixel patches).
    'vit_ti16': stage(12, 192, 2), 'vit_s16': stage(12, 384, 2), 'vit_b16': stage(12, 768, 2),
    'vit_mini4': stage(6, 192, 8), 'vit_l16': stage(24, 1024, 2),
    'vit_h14': stage(32, 1280, 2),  # at 28x28 (14-pixel patches)
    # DeiTs: the same grids, class and distillation tokens dropped.
    'deit_ti16': stage(12, 192, 2), 'deit_s16': stage(12, 384, 2),
    'deit_b16': stage(12, 768, 2), 'deit_mini4': stage(6, 192, 8),
    'vit_micro4': stage(4, 64, 8), 'deit_micro4': stage(4, 64, 8),
}


def test_names_are_the_documented_zoo():
  assert sorted(models.names()) == sorted(TORCH_PARAMETER_COUNTS) == sorted(EXPECTED_TAPS)


def abstract(name, shape, num_classes=100):
  model = models.create(name, num_classes)
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  return model, variables, logits, feats


@pytest.mark.parametrize('name', sorted(EXPECTED_TAPS))
def test_taps_and_parameter_count(name):
  size = 224 if name.endswith('im') else 28 if name == 'vit_h14' else 32
  model, variables, logits, feats = abstract(name, (2, size, size, 3))
  assert logits.shape == (2, 100) and logits.dtype == jnp.float32
  assert [f.shape[1:] for f in feats] == EXPECTED_TAPS[name]
  assert len(model.taps()) == len(feats)
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == TORCH_PARAMETER_COUNTS[name]
  stages = [t.stage for t in model.taps()]
  assert stages == sorted(stages)
  finals = models.stage_final(model.taps())
  assert len(finals) == len(set(stages)) and finals[-1] == len(feats) - 1
  assert all(stages[i] != stages[i + 1] for i in finals[:-1])


@pytest.mark.parametrize('name, shape', [
    ('resnet8', (3, 8, 8, 1)),        # 8x8 grey digits
    ('wrn16x1', (3, 28, 28, 1)),      # 28x28 grey Fashion-MNIST
    ('resnet18im', (2, 45, 45, 3)),   # a size that does not divide evenly
    ('vgg8', (2, 28, 28, 1)),
    ('resnet18', (2, 20, 20, 2)),
])
def test_any_input_size_and_channel_count(name, shape):
  model = models.create(name, 10)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  variables = jax.jit(model.init, static_argnames='train')(jax.random.PRNGKey(0), x, train=False)
  logits, feats = jax.jit(model.apply, static_argnames='train')(variables, x, train=False)
  assert logits.shape == (shape[0], 10)
  assert len(feats) == len(model.taps())
  assert all(f.ndim == 4 and f.shape[0] == shape[0] for f in feats)
  assert np.isfinite(np.asarray(logits)).all()


def test_train_mode_uses_batch_statistics_eval_mode_running_ones():
  model = models.create('resnet8', 10)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  (logits_train, _), updates = apply(variables, x, train=True, mutable=('batch_stats',))
  # Training mode: running statistics move towards the batch ones ...
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates['batch_stats'],
                       variables['batch_stats'])
  assert all(jax.tree.leaves(moved))
  # ... and the output does not depend on them.
  shifted = jax.tree.map(lambda s: s + 1.0, variables['batch_stats'])
  (logits_train2, _), _ = apply({**variables, 'batch_stats': shifted}, x, train=True,
                                mutable=('batch_stats',))
  np.testing.assert_allclose(logits_train, logits_train2, rtol=1e-5, atol=1e-5)
  # Inference mode: the output depends on the running statistics, not on the batch.
  logits_eval, _ = apply(variables, x, train=False)
  logits_eval2, _ = apply({**variables, 'batch_stats': shifted}, x, train=False)
  assert not np.allclose(logits_eval, logits_eval2)
  assert not np.allclose(logits_eval, logits_train)
  first_half, _ = apply(variables, x[:4], train=False)
  np.testing.assert_allclose(first_half, logits_eval[:4], rtol=1e-5, atol=1e-6)


def test_running_variance_is_unbiased_as_in_pytorch():
  from afd_jax.layers import BatchNorm
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3, 2, 4)), jnp.float32)
  bn = BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x, train=False)
  _, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  flat = np.asarray(x).reshape(-1, 4)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * flat.mean(0), rtol=1e-5,
                             atol=1e-7)


def test_bfloat16_activations_keep_float32_parameters_and_logits():
  model = models.create('resnet8', 10, dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 3), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  assert {l.dtype for l in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
  logits, feats = model.apply(variables, x, train=False)
  assert logits.dtype == jnp.float32 and feats[0].dtype == jnp.bfloat16


def test_unknown_model_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet9'.*resnet110.*wrn40x2"):
    models.create('resnet9', 10)


@pytest.mark.parametrize('kwargs, message', [
    ({'num_classes': 0}, 'positive integer'),
    ({'num_classes': 10, 'kwargs': {'width': 2}}, 'zoo model: it takes no kwargs'),
])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.create('resnet8', **kwargs)

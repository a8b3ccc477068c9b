"""The zoo's DeiTs equal transformers' DeiTForImageClassificationWithTeacher (random weights,
nothing downloaded) imported by its 5.x and 4.x names and by timm's names (class head, averaged
eval logits, distillation head, every tap); parameter counts of timm's distilled DeiTs; weights
with and without a distillation token refused by the other kind of model; stochastic depth of
the zoo's ViTs (per sample, per branch, linear over blocks, the 'dropout' stream, 0 = off) and
`drop_path_rate` from a config section.

transformers and torch are optional test dependencies (launch/setup.sh installs both CPU-only);
without them the parity tests skip and say so."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import models, weights
from afd_jax.errors import UserError
from afd_jax.interop import torch as torch_interop
from afd_jax.models import vit
from tests.test_vit import timm_block_names, transformers4_names

BASE = 32  # deit_mini4: patch 4, dim 192, depth 6, heads 3, MLP 384, learned on 32x32


@pytest.fixture(scope='module')
def hugging_face_deit():
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  transformers = pytest.importorskip(
      'transformers', reason='transformers is an optional test dependency (launch/setup.sh)')
  config = transformers.DeiTConfig(
      hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=384,
      patch_size=4, image_size=BASE, num_channels=3, num_labels=10, layer_norm_eps=1e-6,
      hidden_act='gelu', hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      qkv_bias=True)
  torch.manual_seed(0)
  model = transformers.DeiTForImageClassificationWithTeacher(config).eval()
  with torch.no_grad():  # every weight and bias non-trivial, so that a mix-up shows
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model


def timm_names(hf):
  """transformers 5's DeiT names -> timm's, written out from DeiT's models.py
  (`DistilledVisionTransformer`: cls_token, dist_token, pos_embed, head, head_dist over timm's
  VisionTransformer: patch_embed.proj, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
  mlp.fc2}, norm) independently of afd_jax's importer."""
  e = 'deit.embeddings.'
  out = {'cls_token': hf[e + 'cls_token'], 'dist_token': hf[e + 'distillation_token'],
         'pos_embed': hf[e + 'position_embeddings'],
         'patch_embed.proj.weight': hf[e + 'patch_embeddings.projection.weight'],
         'patch_embed.proj.bias': hf[e + 'patch_embeddings.projection.bias']}
  for leaf in ('weight', 'bias'):
    out['norm.' + leaf] = hf['deit.layernorm.' + leaf]
    out['head.' + leaf] = hf['cls_classifier.' + leaf]
    out['head_dist.' + leaf] = hf['distillation_classifier.' + leaf]
  out.update(timm_block_names(hf, 'deit', 6))
  return out


def assert_close(got, want, what):
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * scale, err_msg=what)


@pytest.mark.parametrize('size', [BASE, 16])  # as learned, and through resized positions
def test_heads_and_every_tap_equal_transformers_deit_with_teacher(hugging_face_deit, size):
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    out = hugging_face_deit(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                            output_hidden_states=True, interpolate_pos_encoding=True)
  grid = size // 4
  want_taps = [h.numpy()[:, 2:].reshape(2, grid, grid, -1) for h in out.hidden_states[1:]]
  hf = {k: v.numpy() for k, v in hugging_face_deit.state_dict().items()}
  model = models.create('deit_mini4', 10)

  @jax.jit
  def forward(variables, x):
    (train_logits, _), dist = models.apply_with_dist_logits(model, variables, x, True)
    logits, taps = model.apply(variables, x, train=False)
    return train_logits, dist, logits, taps

  for layout, sd in (('transformers 5', hf), ('transformers 4', transformers4_names(hf, 'deit')),
                     ('timm', timm_names(hf))):
    train_logits, dist, logits, taps = forward(torch_interop.convert('deit_mini4', sd),
                                               jnp.asarray(images))
    wants = [out.cls_logits.numpy(), out.distillation_logits.numpy(), out.logits.numpy()]
    for got, want in zip([train_logits, dist, logits, *taps], wants + want_taps, strict=True):
      assert_close(got, want, f'deit_mini4 at {size}, {layout} names')


def test_eval_logits_are_the_mean_of_the_two_heads_logits():
  model = models.create('deit_mini4', 10)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  (train_logits, _), dist = models.apply_with_dist_logits(model, variables, x, True)
  logits, taps = model.apply(variables, x, train=False)
  assert not np.allclose(train_logits, dist)  # two heads, two answers
  np.testing.assert_allclose(logits, (train_logits + dist) / 2, rtol=1e-6, atol=1e-6)
  assert [t.shape for t in taps] == [(2, 4, 4, 192)] * 6  # both prefix tokens dropped
  assert models.classifier_path(model, variables, (16, 16, 3)) == ('head',)


def test_dist_logits_come_with_the_batch_stats_state_the_embedding_and_through_taps():
  model = models.create('deit_mini4', 10)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  (_, plain) = models.apply_with_dist_logits(model, variables, x, True)
  ((logits, taps), state), dist = models.apply_with_dist_logits(
      model, variables, x, True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(2)})
  assert state == {} and logits.shape == dist.shape == (2, 10) and len(taps) == 6
  np.testing.assert_array_equal(dist, plain)
  tapped = models.create('deit_mini4', 10, taps='auto', image_shape=(16, 16, 3))
  assert models.has_distillation_token(tapped) and tapped.taps()
  (t_logits, _, embedding), t_dist = models.apply_with_dist_logits(
      tapped, variables, x, True, embedding=True)
  np.testing.assert_array_equal(t_dist, dist)
  np.testing.assert_array_equal(t_logits, logits)
  assert embedding.shape == (2, 192)
  student = models.create('vit_mini4', 10)
  assert not models.has_distillation_token(student)
  with pytest.raises(ValueError, match='ViT has no distillation token'):
    models.apply_with_dist_logits(student, variables, x, True)
  assert set(models.DISTILLED_NAMES) == {'deit_ti16', 'deit_s16', 'deit_b16', 'deit_mini4',
                                         'deit_micro4'}


# timm's deit_{tiny,small,base}_distilled_patch16_224 (1000 classes): 5,910,800 / 22,436,432 /
# 87,338,192 parameters; deit_mini4 by the same count (its ViT plus a token, a position row and
# a head: 1,823,908 + 2 x 192 + 192 x 100 + 100 at 100 classes).
@pytest.mark.parametrize('name, classes, count', [
    ('deit_ti16', 1000, 5910800), ('deit_s16', 1000, 22436432), ('deit_b16', 1000, 87338192),
    ('deit_mini4', 100, 1843592)])
def test_parameter_counts_are_timms_distilled_deits(name, classes, count):
  model = models.create(name, classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                              train=False))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count
  assert shapes['params']['pos_embed'].shape[1] == 2 + (model.image_size // model.patch) ** 2


def random_state_dict(name):
  model = models.create(name, 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                              train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), shapes)
  return variables, torch_interop.to_state_dict(name, variables)


def test_timm_names_round_trip():
  variables, sd = random_state_dict('deit_mini4')
  assert sd['dist_token'].shape == (1, 1, 192) and sd['pos_embed'].shape == (1, 66, 192)
  assert sd['head_dist.weight'].shape == (10, 192)
  jax.tree.map(np.testing.assert_array_equal, torch_interop.convert('deit_mini4', sd), variables)


def test_weights_without_a_distillation_token_are_refused_by_a_deit_and_the_reverse(tmp_path):
  _, plain = random_state_dict('vit_mini4')
  _, distilled = random_state_dict('deit_mini4')
  with pytest.raises(ValueError) as error:
    torch_interop.convert('deit_mini4', plain)
  assert '\n' not in str(error.value)
  assert str(error.value).startswith('these weights have no distillation token')
  assert "use 'vit_mini4'" in str(error.value)
  with pytest.raises(ValueError, match="distillation token .*'vit_mini4' has none: use "
                                       "'deit_mini4'"):
    torch_interop.convert('vit_mini4', distilled)
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  path = tmp_path / 'vit.pth'
  torch.save({k: torch.from_numpy(v) for k, v in plain.items()}, path)
  model = models.create('deit_mini4', 10)
  with pytest.raises(UserError, match='no distillation token') as error:
    weights.load_model_variables(str(path), 'deit_mini4', model, 10, (32, 32, 3),
                                 'student checkpoint')
  assert '\n' not in str(error.value)


def test_drop_path_drops_whole_samples_in_training_only():
  x = jnp.ones((4000, 3, 5))
  keys = {'dropout': jax.random.PRNGKey(0)}
  out = _drop(x, 0.25, True, keys)
  per_sample = np.asarray(out).reshape(4000, -1)
  assert set(np.unique(per_sample).tolist()) == {0.0, np.float32(1 / 0.75).item()}
  assert (per_sample == per_sample[:, :1]).all()  # a sample is kept or dropped as a whole
  assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03
  np.testing.assert_array_equal(_drop(x, 0.25, True, keys), out)  # the key decides
  assert not np.array_equal(_drop(x, 0.25, True, {'dropout': jax.random.PRNGKey(1)}), out)
  np.testing.assert_array_equal(_drop(x, 0.25, False, {}), x)
  np.testing.assert_array_equal(_drop(x, 0.0, True, {}), x)  # no key needed at 0


class _Drop(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x, train):
    return vit.drop_path(self, x, self.rate, train)


def _drop(x, rate, train, rngs):
  return _Drop(rate).apply({}, x, train, rngs=rngs)


def test_vit_stochastic_depth_is_linear_over_blocks_and_per_branch():
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.EncoderBlock) and context.method_name == '__call__':
      rates[context.module.name] = context.module.drop_path_rate
    return next_fun(*args, **kwargs)

  model = models.create('vit_mini4', 10, drop_path_rate=0.3)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  with nn.intercept_methods(record):
    model.apply(variables, x, train=False)
  np.testing.assert_allclose([rates[f'blocks_{i}'] for i in range(6)], np.linspace(0, 0.3, 6))
  block = vit.EncoderBlock(3, 384, drop_path_rate=0.5)
  tokens = jax.random.normal(jax.random.PRNGKey(2), (64, 5, 192))
  params = block.init(jax.random.PRNGKey(0), tokens)['params']
  got = block.apply({'params': params}, tokens, True, rngs={'dropout': jax.random.PRNGKey(3)})
  attn, mlp = branches(params)
  matches = []  # per (attention kept, MLP kept) (kept ones scaled by 2): the samples it explains
  for keep_attn in (0, 1):
    for keep_mlp in (0, 1):
      y = tokens + 2 * keep_attn * attn(tokens)
      want = np.asarray(y + 2 * keep_mlp * mlp(y))
      matches.append(np.isclose(got, want, atol=1e-4).all(axis=(1, 2)))
  matches = np.stack(matches)
  assert (matches.sum(0) == 1).all()  # every sample is exactly one of the four
  assert matches.any(1).all()  # and each of the four occurs: two masks, drawn apart


def branches(params):
  """The attention and MLP branches of an EncoderBlock with `params`, applied one by one."""
  norm = lambda name, t: nn.LayerNorm(1e-6).apply({'params': params[name]}, t)
  dense = lambda name, t: nn.Dense(params[name]['bias'].shape[0]).apply(
      {'params': params[name]}, t)
  attn = lambda t: vit.Attention(3).apply({'params': params['attn']}, norm('norm1', t))
  mlp = lambda t: dense('fc2', nn.gelu(dense('fc1', norm('norm2', t)), approximate=False))
  return attn, mlp


def test_vit_drop_path_zero_needs_no_key_and_rate_only_acts_in_training():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  plain, deep = models.create('deit_mini4', 10), models.create('deit_mini4', 10,
                                                                 drop_path_rate=0.5)
  variables = plain.init(jax.random.PRNGKey(0), x, train=False)
  train = plain.apply(variables, x, train=True)  # no 'dropout' key at 0
  jax.tree.map(np.testing.assert_array_equal, deep.apply(variables, x, train=False),
               plain.apply(variables, x, train=False))
  one = deep.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(5)})
  again = deep.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(5)})
  other = deep.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(6)})
  jax.tree.map(np.testing.assert_array_equal, one, again)
  assert not np.allclose(one[0], train[0]) and not np.allclose(one[0], other[0])


def test_drop_path_rate_from_a_config_section():
  section = lambda name, rate, **kw: types.SimpleNamespace(name=name, drop_path_rate=rate, **kw)
  assert models.from_config(section('deit_mini4', 0.1), 10).drop_path_rate == 0.1
  assert models.from_config(section('vit_ti16', 0.0), 10).drop_path_rate == 0.0
  assert models.from_config(section('resnet8', 0.0), 10) is not None  # 0 passes nothing
  with pytest.raises(ValueError) as error:
    models.from_config(section('resnet8', 0.1), 10)
  message = str(error.value)
  assert '\n' not in message and "model 'resnet8' has no stochastic depth" in message
  assert 'deit_mini4' in message and 'vit_ti16' in message and 'resnet' not in message[40:]
  factory = models.from_config(section('afd_jax.models.vit:ViT', 0.2, kwargs=dict(
      patch=4, dim=12, depth=2, heads=3, mlp_dim=24, image_size=8)), 10, image_shape=(8, 8, 3))
  assert factory.module.drop_path_rate == 0.2
  with pytest.raises(ValueError, match="'CifarResNet' has no stochastic depth"):
    models.from_config(section('afd_jax.models.resnet_cifar:CifarResNet', 0.2, kwargs=dict(
        depth=8, widths=(4, 4, 8, 8))), 10, image_shape=(8, 8, 3))
  with pytest.raises(ValueError, match=r'drop_path_rate must be in \[0, 1\)'):
    models.from_config(section('deit_mini4', 1.0), 10)

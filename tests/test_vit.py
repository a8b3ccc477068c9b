"""The zoo's ViTs equal a PyTorch ViT: transformers' ViTForImageClassification (random weights,
nothing downloaded), imported by name, and the same weights in timm's names; position
embeddings resized as torch's bicubic; refusals of mismatched sizes.

transformers and torch are optional test dependencies (launch/setup.sh installs both CPU-only);
without them the parity tests skip and say so."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from afd_jax import models
from afd_jax.interop import torch as torch_interop
from afd_jax.interop import vit as vit_interop
from afd_jax.models import vit

SIZES = {'vit_ti16': (192, 12, 3, 768, 16), 'vit_s16': (384, 12, 6, 1536, 16),
         'vit_mini4': (192, 6, 3, 384, 4)}


def hugging_face_vit(name, num_classes, base_size, sizes=None):
  """transformers' ViT of zoo model `name`'s sizes (or of `sizes`: dim, depth, heads, mlp,
  patch), random non-trivial weights."""
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  transformers = pytest.importorskip(
      'transformers', reason='transformers is an optional test dependency (launch/setup.sh)')
  dim, depth, heads, mlp, patch = sizes or SIZES[name]
  config = transformers.ViTConfig(
      hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
      patch_size=patch, image_size=base_size, num_channels=3, num_labels=num_classes,
      layer_norm_eps=1e-6, hidden_act='gelu', hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, qkv_bias=True)
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(config).eval()
  with torch.no_grad():  # every weight and bias non-trivial, so that a mix-up shows
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model


# (model, image size): 224 as trained, other sizes through the resized position embeddings.
CASES = [('vit_s16', 224), ('vit_ti16', 160), ('vit_mini4', 28)]


@pytest.mark.parametrize('name, size', CASES, ids=[f'{n}_{s}' for n, s in CASES])
def test_logits_and_every_tap_equal_transformers_vit(name, size):
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  model_pt = hugging_face_vit(name, 10, models.create(name, 10).image_size)
  images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    out = model_pt(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                   output_hidden_states=True, interpolate_pos_encoding=True)
  state_dict = {k: v.numpy() for k, v in model_pt.state_dict().items()}
  grid = size // SIZES[name][4]
  want_taps = [h.numpy()[:, 1:].reshape(2, grid, grid, -1) for h in out.hidden_states[1:]]
  timm = timm_names(state_dict)
  model = models.create(name, 10)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  for layout, sd in (('transformers 5', state_dict), ('transformers 4', transformers4_names(
      state_dict)), ('timm', timm)):
    logits, taps = apply(torch_interop.convert(name, sd), jnp.asarray(images))
    for got, want in zip([logits, *taps], [out.logits.numpy(), *want_taps], strict=True):
      scale = float(np.abs(want).max())
      np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * scale,
                                 err_msg=f'{name} at {size}, {layout} names')


# The foundation-size ViTs at a width the suite can run: their patch size and head count, with
# narrow blocks (dim, depth, mlp) in place of (1024, 24, 4096) and (1280, 32, 5120).
NARROW = {'vit_l16': dict(dim=64, depth=2, mlp_dim=128), 'vit_h14': dict(dim=80, depth=2,
                                                                          mlp_dim=160)}


@pytest.mark.parametrize('name', sorted(NARROW))
def test_a_narrow_copy_of_each_foundation_vit_equals_transformers_vit(name):
  """vit_l16 / vit_h14's own patch size, head count and 224x224 grid (14 x 14 patches of 16,
  16 x 16 of 14), with narrow blocks: logits and every tap equal transformers' ViT with the
  same weights, imported by the zoo's importer in transformers' and in timm's names, and
  exported to timm's names and back unchanged."""
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  options = {**vit.CONFIGS[name], **NARROW[name]}
  model = vit.ViT(num_classes=10, **options)
  model_pt = hugging_face_vit(name, 10, 224, sizes=tuple(
      options[k] for k in ('dim', 'depth', 'heads', 'mlp_dim', 'patch')))
  images = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    out = model_pt(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                   output_hidden_states=True)
  state_dict = {k: v.numpy() for k, v in model_pt.state_dict().items()}
  grid = 224 // options['patch']
  want = [out.logits.numpy()] + [h.numpy()[:, 1:].reshape(1, grid, grid, -1)
                                 for h in out.hidden_states[1:]]
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  for layout, sd in (('transformers', state_dict), ('timm', timm_names(state_dict))):
    variables = vit_interop.convert(name, sd, model)
    back = vit_interop.convert(name, vit_interop.to_state_dict(variables), model)
    jax.tree.map(np.testing.assert_array_equal, back, variables)  # and back to timm's names
    logits, taps = apply(variables, jnp.asarray(images))
    for got, expected in zip([logits, *taps], want, strict=True):
      np.testing.assert_allclose(np.asarray(got), expected, rtol=0,
                                 atol=1e-4 * float(np.abs(expected).max()),
                                 err_msg=f'narrow {name}, {layout} names')


@pytest.mark.parametrize('name, params, grid, width, depth',
                         [('vit_l16', 304_326_632, 14, 1024, 24),
                          ('vit_h14', 632_045_800, 16, 1280, 32)])
def test_foundation_vits_at_full_size_have_timms_parameter_count_and_tap_shapes(
    name, params, grid, width, depth):
  """Shapes only (nothing is allocated): at 1000 classes the parameter count of timm's
  vit_large_patch16_224 / vit_huge_patch14_224, and one grid x grid x width tap per block."""
  model = models.create(name, 1000)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                             images)
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params'])) == params
  logits, taps = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert logits.shape == (2, 1000)
  assert [t.shape for t in taps] == [(2, grid, grid, width)] * depth
  assert len(model.taps()) == depth


def timm_names(hf):
  """transformers 5's ViT names -> timm's, written out from timm's vision_transformer.py
  (`VisionTransformer`: patch_embed.proj, cls_token, pos_embed, blocks.{i}.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head) independently of afd_jax's importer."""
  out = {'cls_token': hf['vit.embeddings.cls_token'],
         'pos_embed': hf['vit.embeddings.position_embeddings'],
         'patch_embed.proj.weight': hf['vit.embeddings.patch_embeddings.projection.weight'],
         'patch_embed.proj.bias': hf['vit.embeddings.patch_embeddings.projection.bias'],
         'norm.weight': hf['vit.layernorm.weight'], 'norm.bias': hf['vit.layernorm.bias'],
         'head.weight': hf['classifier.weight'], 'head.bias': hf['classifier.bias']}
  out.update(timm_block_names(hf, 'vit', depth_of(hf)))
  return out


def timm_block_names(hf, prefix: str, depth: int):
  """transformers 5's encoder blocks under `prefix.layers.{i}` -> timm's `blocks.{i}.*` (the
  same in ViT and DeiT)."""
  out = {}
  for i in range(depth):
    h, t = f'{prefix}.layers.{i}.', f'blocks.{i}.'
    for leaf in ('weight', 'bias'):
      out[t + 'norm1.' + leaf] = hf[h + 'layernorm_before.' + leaf]
      out[t + 'attn.qkv.' + leaf] = np.concatenate(
          [hf[f'{h}attention.{p}_proj.{leaf}'] for p in 'qkv'])
      out[t + 'attn.proj.' + leaf] = hf[h + 'attention.o_proj.' + leaf]
      out[t + 'norm2.' + leaf] = hf[h + 'layernorm_after.' + leaf]
      out[t + 'mlp.fc1.' + leaf] = hf[h + 'mlp.fc1.' + leaf]
      out[t + 'mlp.fc2.' + leaf] = hf[h + 'mlp.fc2.' + leaf]
  return out


def transformers4_names(hf, prefix: str = 'vit'):
  """transformers 5's ViT (DeiT: `prefix` 'deit') names -> 4.x's (what the files on the Hub
  hold), from 4.x's modeling_vit.py / modeling_deit.py (attention.attention.{query,key,value},
  attention.output.dense, intermediate.dense, output.dense, layernorm_before/after under
  `prefix`.encoder.layer.{i})."""
  parts = {'attention.q_proj': 'attention.attention.query',
           'attention.k_proj': 'attention.attention.key',
           'attention.v_proj': 'attention.attention.value',
           'attention.o_proj': 'attention.output.dense', 'mlp.fc1': 'intermediate.dense',
           'mlp.fc2': 'output.dense'}
  out = {}
  for key, value in hf.items():
    if key.startswith(f'{prefix}.layers.'):
      i, rest = key[len(f'{prefix}.layers.'):].split('.', 1)
      part, leaf = rest.rsplit('.', 1)
      key = f'{prefix}.encoder.layer.{i}.{parts.get(part, part)}.{leaf}'
    out[key] = value
  return out


def depth_of(hf):
  return 1 + max(int(k.split('.')[2]) for k in hf if k.startswith('vit.layers.'))


def test_position_embeddings_resize_like_torch_bicubic():
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  grid = np.random.default_rng(1).normal(size=(1, 8, 8, 5)).astype(np.float32)
  for height, width in ((7, 7), (10, 6), (8, 8)):
    want = torch.nn.functional.interpolate(
        torch.from_numpy(grid.transpose(0, 3, 1, 2)), size=(height, width), mode='bicubic',
        align_corners=False).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(vit.resize_position_grid(jnp.asarray(grid), height, width))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_a_timm_state_dict_of_another_size_is_one_clear_error():
  small = torch_interop.to_state_dict('vit_mini4', models.create('vit_mini4', 10).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert 'blocks.5.attn.qkv.weight' in small and small['blocks.5.attn.qkv.weight'].shape == (576, 192)
  with pytest.raises(ValueError) as error:
    torch_interop.convert('vit_s16', small)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith("state_dict does not fit model 'vit_s16' (10 classes, timm layout): "
                            'missing entries: blocks.10.attn.proj.bias')
  assert 'wrongly shaped entries: blocks.0.attn.proj.bias: got (192,), expected (384,)' in message


def test_tokens_of_a_size_that_does_not_divide_by_the_patch_are_refused():
  model = models.create('vit_mini4', 10)
  with pytest.raises(ValueError, match='must divide by the patch size 4'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 3)),
                                      train=False))

"""PyTorch ViT state_dicts -> Flax variables for the zoo's ViTs and DeiTs (afd_jax/models/vit.py,
deit.py).

Two layouts, told apart by their keys:
- timm's (`vit_small_patch16_224` etc.; what DeiT / AugReg `.pth` and `.safetensors` use):
  `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
  mlp.fc1,mlp.fc2}`, `norm`, `head`; the distilled DeiTs (`deit_*_distilled_patch16_224`)
  add `dist_token` and `head_dist`, and `pos_embed` has a row for each of the two tokens;
- Hugging Face transformers' `ViTForImageClassification`: `vit.embeddings.*`, blocks as
  4.x and the files on the Hub name them (`vit.encoder.layer.{i}.{layernorm_before,
  attention.attention.{query,key,value},attention.output.dense,layernorm_after,
  intermediate.dense,output.dense}`) or as 5.x's state_dict does (`vit.layers.{i}.{
  layernorm_before,attention.{q,k,v,o}_proj,layernorm_after,mlp.fc1,mlp.fc2}`), `vit.layernorm`,
  `classifier`; the separate query/key/value become the fused qkv, in that order. Its
  `DeiTForImageClassificationWithTeacher` is the same under `deit.`, with
  `embeddings.distillation_token`, `cls_classifier` and `distillation_classifier`.

Weights with a distillation token fit only a zoo DeiT (`deit_*`), and weights without one only
a zoo ViT (`vit_*`); the other way round is refused in one line.
"""
import re
from typing import Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from afd_jax import models
from afd_jax.interop import state_dict

# Block parts, transformers 4 (the names in files on the Hub) and 5 (its in-memory state_dict).
_HF_BLOCK = {'layernorm_before': 'norm1', 'attention.output.dense': 'attn.proj',
             'attention.o_proj': 'attn.proj', 'layernorm_after': 'norm2',
             'intermediate.dense': 'mlp.fc1', 'output.dense': 'mlp.fc2', 'mlp.fc1': 'mlp.fc1',
             'mlp.fc2': 'mlp.fc2'}
_HF_QKV = {'attention.attention.query': 'q', 'attention.attention.key': 'k',
           'attention.attention.value': 'v', 'attention.q_proj': 'q', 'attention.k_proj': 'k',
           'attention.v_proj': 'v'}
_HF_TOP = {'embeddings.cls_token': 'cls_token', 'embeddings.position_embeddings': 'pos_embed',
           'embeddings.distillation_token': 'dist_token',
           'cls_classifier.weight': 'head.weight', 'cls_classifier.bias': 'head.bias',
           'distillation_classifier.weight': 'head_dist.weight',
           'distillation_classifier.bias': 'head_dist.bias',
           'embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
           'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
           'layernorm.weight': 'norm.weight', 'layernorm.bias': 'norm.bias',
           'classifier.weight': 'head.weight', 'classifier.bias': 'head.bias'}


def is_hugging_face(sd: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith(('vit.embeddings.', 'deit.embeddings.', 'embeddings.')) for k in sd)


def hugging_face_to_timm(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """transformers' ViT and DeiT names (4.x `encoder.layer.{i}.attention.attention.query`, 5.x
  `layers.{i}.attention.q_proj`) -> timm's, fusing query/key/value into qkv."""
  sd = {re.sub(r'^(?:vit|deit)\.', '', k): v for k, v in sd.items()}
  out, qkv = {}, {}
  for key, value in sd.items():
    m = re.match(r'^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$', key)
    if not m:
      out[_HF_TOP.get(key, key)] = value
      continue
    i, part, leaf = m.groups()
    if part in _HF_QKV:
      qkv.setdefault((i, leaf), {})[_HF_QKV[part]] = value
    else:
      out[f'blocks.{i}.{_HF_BLOCK.get(part, part)}.{leaf}'] = value
  for (i, leaf), parts in qkv.items():
    if set(parts) == {'q', 'k', 'v'}:
      out[f'blocks.{i}.attn.qkv.{leaf}'] = np.concatenate([parts['q'], parts['k'], parts['v']])
    else:  # reported as missing qkv plus unexpected leftovers
      out.update({f'blocks.{i}.attn.{p}.{leaf}': v for p, v in parts.items()})
  return out


def _flax_key(path) -> str:
  """Flax path (('blocks_3', 'attn', 'qkv', 'kernel')) -> timm name."""
  names = [p.key for p in path]
  if names[0].startswith('blocks_'):
    names[0] = 'blocks.' + names[0][len('blocks_'):]
    if names[1] in ('fc1', 'fc2'):
      names[1] = 'mlp.' + names[1]
  elif names[0] == 'patch_embed':
    names[0] = 'patch_embed.proj'
  leaf = {'kernel': 'weight', 'scale': 'weight'}.get(names[-1], names[-1])
  return '.'.join(names[:-1] + [leaf])


def _hugging_face_class(sd: Mapping[str, np.ndarray]) -> str:
  if any(k.startswith('distillation_classifier.') for k in sd):
    return 'DeiTForImageClassificationWithTeacher'
  deit = any(k.startswith('deit.') for k in sd)
  return 'DeiTForImageClassification' if deit else 'ViTForImageClassification'


def _check_distillation_token(name: str, model, sd: Mapping[str, np.ndarray]) -> None:
  """ValueError if the weights have a distillation token and the model none, or the reverse."""
  if models.has_distillation_token(model) == ('dist_token' in sd):
    return
  other = (name.replace('deit_', 'vit_', 1) if name.startswith('deit_')
           else name.replace('vit_', 'deit_', 1))
  if 'dist_token' in sd:
    raise ValueError(f'these weights have a distillation token (dist_token, a distilled DeiT); '
                     f'model {name!r} has none: use {other!r}.')
  raise ValueError(f'these weights have no distillation token (a ViT or a non-distilled DeiT); '
                   f"model {name!r} needs one and its head_dist (timm's "
                   "deit_*_distilled_patch16_224, transformers' "
                   f'DeiTForImageClassificationWithTeacher): use {other!r} for them.')


def convert(name: str, sd: Mapping[str, np.ndarray], model=None):
  """A timm or transformers ViT / DeiT state_dict -> `{'params': ...}` for zoo model `name`
  (or for `model`, a `ViT` / `DeiT` of other sizes, such as a narrow copy of a large one)."""
  if is_hugging_face(sd):
    sd, layout = hugging_face_to_timm(sd), f"transformers' {_hugging_face_class(sd)}"
  else:
    layout = 'timm'
  sd = {k: np.asarray(v) for k, v in sd.items()}
  num_classes = int(sd['head.weight'].shape[0]) if 'head.weight' in sd else 1
  channels = int(sd['patch_embed.proj.weight'].shape[1]) if 'patch_embed.proj.weight' in sd else 3
  model = models.create(name, num_classes) if model is None else model
  _check_distillation_token(name, model, sd)
  images = jnp.zeros((1, model.image_size, model.image_size, channels), jnp.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  return {'params': state_dict.fill(abstract['params'], sd, _flax_key,
                                    f'model {name!r} ({num_classes} classes, {layout} layout)')}


def to_state_dict(variables) -> Dict[str, np.ndarray]:
  """Zoo ViT variables -> timm's names and layouts."""
  return {_flax_key(path): state_dict.to_torch(path[-1].key, np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables['params']))[0]}

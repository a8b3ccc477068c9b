"""PyTorch ViT state_dicts -> Flax variables for the zoo's ViTs (afd_jax/models/vit.py).

Two layouts, told apart by their keys:
- timm's (`vit_small_patch16_224` etc.; what DeiT / AugReg `.pth` and `.safetensors` use):
  `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
  mlp.fc1,mlp.fc2}`, `norm`, `head`;
- Hugging Face transformers' `ViTForImageClassification`: `vit.embeddings.*`, blocks as
  4.x and the files on the Hub name them (`vit.encoder.layer.{i}.{layernorm_before,
  attention.attention.{query,key,value},attention.output.dense,layernorm_after,
  intermediate.dense,output.dense}`) or as 5.x's state_dict does (`vit.layers.{i}.{
  layernorm_before,attention.{q,k,v,o}_proj,layernorm_after,mlp.fc1,mlp.fc2}`), `vit.layernorm`,
  `classifier`; the separate query/key/value become the fused qkv, in that order.
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
           'embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
           'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
           'layernorm.weight': 'norm.weight', 'layernorm.bias': 'norm.bias',
           'classifier.weight': 'head.weight', 'classifier.bias': 'head.bias'}


def is_hugging_face(sd: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith(('vit.embeddings.', 'embeddings.')) for k in sd)


def hugging_face_to_timm(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """transformers' ViT names (4.x `encoder.layer.{i}.attention.attention.query`, 5.x
  `layers.{i}.attention.q_proj`) -> timm's, fusing query/key/value into qkv."""
  sd = {k[len('vit.'):] if k.startswith('vit.') else k: v for k, v in sd.items()}
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


def convert(name: str, sd: Mapping[str, np.ndarray]):
  """A timm or transformers ViT state_dict -> `{'params': ...}` for zoo model `name`."""
  if is_hugging_face(sd):
    sd, layout = hugging_face_to_timm(sd), "transformers' ViTForImageClassification"
  else:
    layout = 'timm'
  sd = {k: np.asarray(v) for k, v in sd.items()}
  num_classes = int(sd['head.weight'].shape[0]) if 'head.weight' in sd else 1
  channels = int(sd['patch_embed.proj.weight'].shape[1]) if 'patch_embed.proj.weight' in sd else 3
  model = models.create(name, num_classes)
  images = jnp.zeros((1, model.image_size, model.image_size, channels), jnp.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  return {'params': state_dict.fill(abstract['params'], sd, _flax_key,
                                    f'model {name!r} ({num_classes} classes, {layout} layout)')}


def to_state_dict(variables) -> Dict[str, np.ndarray]:
  """Zoo ViT variables -> timm's names and layouts."""
  return {_flax_key(path): state_dict.to_torch(path[-1].key, np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables['params']))[0]}

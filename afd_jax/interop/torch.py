"""PyTorch state_dicts -> Flax variables, for the model zoo and the official AFD module.

`convert(name, state_dict)` takes the official / CRD-benchmark parameter names (torchvision's
for the `*im` ResNets) or, with `name='afd'`, the official AFD module's (`attention....`).
`load(name, path)` reads a `.pth` with `torch.load(..., weights_only=True)`: a checkpoint is
data, never code. torch is optional: it is imported only by `load` and only to read the file.
"""
import pickle
import re
from typing import Any, Callable, Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from afd_jax import models
from afd_jax.distill import AFD, afd
from afd_jax.interop import state_dict
from afd_jax.interop import vit as vit_interop
from afd_jax.models.resnet import ResNet
from afd_jax.models.resnet_cifar import CifarResNet
from afd_jax.models.vgg import VGG
from afd_jax.models.wrn import WideResNet

_LEAVES = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'mean': 'running_mean',
           'var': 'running_var'}
_HEADS = {CifarResNet: 'fc', WideResNet: 'fc', VGG: 'classifier'}


def _rename_block(segment: str) -> str:
  """'layer1_0' -> 'layer1.0' (ResNets)."""
  return re.sub(r'^(layer\d+)_(\d+)$', r'\1.\2', segment)


def _resnet_segment(model) -> Callable[[str], str]:
  shortcut = 'downsample' if getattr(model, 'imagenet_stem', True) else 'shortcut'
  head = 'linear' if isinstance(model, ResNet) and not model.imagenet_stem else 'fc'
  names = {'downsample_conv': f'{shortcut}.0', 'downsample_bn': f'{shortcut}.1', 'fc': head}
  return lambda seg: names.get(seg, _rename_block(seg))


def _wrn_segment(seg: str) -> str:
  seg = re.sub(r'^(block\d+)_(\d+)$', r'\1.layer.\2', seg)
  return 'convShortcut' if seg == 'shortcut' else seg


def _vgg_segment(seg: str) -> str:
  m = re.match(r'^block(\d+)_(conv|bn)(\d+)$', seg)
  if m:
    return f'block{m[1]}.{3 * int(m[3]) + (m[2] == "bn")}'
  return 'classifier' if seg == 'fc' else seg


def _afd_segment(seg: str) -> str:
  m = re.match(r'^(query|key)_(\d+)$', seg)
  if m:
    side = 'linear_trans_t.query_layer' if m[1] == 'query' else 'linear_trans_s.key_layer'
    return f'attention.{side}.{m[2]}'
  if seg == 'bilinear':
    return 'attention.linear_trans_s.bilinear'
  return f'attention.{seg}' if seg in ('p_t', 'p_s') else seg


def _model_segment(model) -> Callable[[str], str]:
  if isinstance(model, WideResNet):
    return _wrn_segment
  if isinstance(model, VGG):
    return _vgg_segment
  return _resnet_segment(model)


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _clean(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Drops `num_batches_tracked` and a DataParallel `module.` prefix."""
  if not isinstance(state_dict, Mapping):
    raise ValueError(f'state_dict must be a mapping of names to arrays, got '
                     f'{type(state_dict).__name__}.')
  out = {}
  for key, value in state_dict.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    if not key.endswith('num_batches_tracked'):
      out[key] = _to_numpy(value)
  return out


def _torch_key(path, segment: Callable[[str], str]) -> str:
  """PyTorch state_dict name of the Flax variable at `path` (collection first)."""
  names = [p.key for p in path]
  if names[-1] in ('p_t', 'p_s'):
    return segment(names[-1])
  return '.'.join([segment(n) for n in names[1:-1]] + [_LEAVES[names[-1]]])


def _first_dim(sd, key, default, axis=0):
  return int(sd[key].shape[axis]) if key in sd and sd[key].ndim > axis else default


def _convert_model(name: str, sd: Dict[str, np.ndarray]):
  probe = models.create(name, 1)
  segment = _model_segment(probe)
  head = segment('fc')
  num_classes = _first_dim(sd, f'{head}.weight', 1)
  first_conv = 'block0.0.weight' if isinstance(probe, VGG) else 'conv1.weight'
  channels = _first_dim(sd, first_conv, 3, axis=1)
  model = models.create(name, num_classes)
  images = jnp.zeros((1, 32, 32, channels), jnp.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  return state_dict.fill(abstract, sd, lambda path: _torch_key(path, segment), f'model {name!r} ({num_classes} classes)')


def _convert_afd(sd: Dict[str, np.ndarray]):
  sd = {k if k.startswith('attention.') else f'attention.{k}': v for k, v in sd.items()}
  if 'attention.p_t' not in sd or 'attention.p_s' not in sd:
    raise ValueError('state_dict does not fit the AFD module: missing entries: '
                     + ', '.join(k for k in ('attention.p_t', 'attention.p_s') if k not in sd))
  (t, d), s = sd['attention.p_t'].shape, sd['attention.p_s'].shape[0]

  def features(side, count):
    chans = [_first_dim(sd, f'attention.{side}.{i}.linear.weight', 1, axis=1)
             for i in range(count)]
    return [jnp.zeros((2, 1, 1, c), jnp.float32) for c in chans]

  student = features('linear_trans_s.key_layer', s)
  teacher = features('linear_trans_t.query_layer', t)
  abstract = jax.eval_shape(
      lambda: AFD(qk_dim=d).init(jax.random.PRNGKey(0), student, teacher, train=False))
  per_tap = state_dict.fill(jax.eval_shape(afd.per_tap_variables, abstract), sd,
                            lambda path: _torch_key(path, _afd_segment),
                            f'the AFD module (T={t}, S={s}, qk_dim={d})')
  return afd.stacked_like(per_tap, abstract)


def to_state_dict(name: str, variables) -> Dict[str, np.ndarray]:
  """Flax variables of model `name` (or `'afd'`) -> a PyTorch-named, PyTorch-laid-out dict.

  The inverse of `convert` (without `num_batches_tracked`), e.g. to take a student trained
  here back to PyTorch with `model.load_state_dict({k: torch.from_numpy(v) ...}, strict=False)`.
  """
  if name == 'afd':
    segment, variables = _afd_segment, afd.per_tap_variables(variables)
  elif name in models.VIT_NAMES:
    return vit_interop.to_state_dict(variables)
  else:
    segment = _model_segment(models.create(name, 1))
  return {_torch_key(path, segment): state_dict.to_torch(path[-1].key, np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}


def convert(name: str, state_dict: Mapping[str, Any]):
  """PyTorch `state_dict` -> Flax variables `{'params', 'batch_stats'}` for model `name`.

  `name` is a model name of `afd_jax.models.names()`, or `'afd'` for the official AFD module.
  Raises ValueError naming every missing, unexpected or wrongly shaped entry.
  """
  sd = _clean(state_dict)
  if name == 'afd':
    return _convert_afd(sd)
  if name not in models.names():
    raise ValueError(f'Unknown model {name!r}. Known models: {", ".join(models.names())}, '
                     'or "afd" for the AFD module.')
  if name in models.VIT_NAMES:  # timm's or transformers' names
    return vit_interop.convert(name, sd)
  return _convert_model(name, sd)


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:120]}' if text else type(error).__name__


def read_state_dict(path: str) -> Dict[str, Any]:
  """Reads a `.pth` (bare state_dict or `{'model': state_dict, ...}`) without running code."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading a PyTorch checkpoint needs torch: pip install torch '
                      '(a CPU build is enough).') from e
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic != b'PK\x03\x04' and magic[:1] != b'\x80':  # neither torch's zip nor a pickle stream
    raise ValueError('not a PyTorch checkpoint (neither a torch.save zip file nor a pickle).')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    if 'unsupported global' in str(e).lower():  # the weights-only unpickler met a Python object
      raise ValueError('refused: it holds pickled Python objects, not only tensors (loading it '
                       'would run code; nothing in it was run).') from None
    raise ValueError(f'not a PyTorch checkpoint ({_first_line(e)}).') from None
  except (KeyError, EOFError, RuntimeError, AttributeError, IndexError, TypeError) as e:
    raise ValueError(f'not a PyTorch checkpoint ({_first_line(e)}).') from None
  for key in ('model', 'state_dict'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state_dict.')
  return dict(obj)


def read_safetensors(path: str) -> Dict[str, Any]:
  """A `.safetensors` file's tensors (the format holds no code)."""
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading .safetensors needs the safetensors package: pip install '
                      'safetensors.') from e
  try:
    return dict(load_file(path))
  except Exception as e:  # pylint: disable=broad-except  (the library raises its own types)
    raise ValueError(f'not a safetensors file ({_first_line(e)}).') from None


def load(name: str, path: str):
  """`convert(name, state_dict)` read from `path`: a `.pth` or a `.safetensors` file."""
  if str(path).endswith('.safetensors'):
    return convert(name, read_safetensors(path))
  return convert(name, read_state_dict(path))

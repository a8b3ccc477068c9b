"""Feature taps on any linen module, without editing or subclassing it.

`tap(module, taps='auto')` wraps a linen module whose `__call__(images, train)` returns logits
(or `(logits, anything)`) into an object with the zoo's contract: `init` / `apply` return
`(logits, features)` and `taps()` names the features. Its variables are the module's own, so
checkpoints of the bare module load unchanged.

How the taps are found: one abstract trace (`jax.eval_shape`) of the module with a Flax method
interceptor (`nn.intercept_methods`) records every submodule call: its path, class and output.
- A list of patterns (globs over '/'-joined module paths, e.g. `'layer*'`,
  `'Transformer/encoderblock_*'`; `*` and `?` stay within one path component, `**` crosses
  them) taps every call whose path matches one of them, in network (call) order. Values that the module stores with `self.sow('intermediates', name, x)` are
  matched too, as `path/name` (NNX modules through `flax.nnx.bridge.to_linen` sow this way).
- `'auto'` taps the outputs of the network's repeated blocks. The rule: among module classes
  that are *blocks* (a call that itself calls two or more submodules; Flax's own layers and
  leaf layers never qualify) and are called at least twice, the class with the most calls; on a
  tie, the one nearer the root. Residual blocks, transformer encoder blocks and ConvNeXt blocks
  are found this way. A module with no such blocks that sows intermediates (an NNX model
  through the bridge is one linen module) is tapped at what it sows. On afd_jax's zoo this gives exactly the taps of docs/method.md for the CIFAR
  and ImageNet ResNets except resnet110 (the spec taps every second block; auto taps all 54).
  For the WRNs auto taps the blocks' raw outputs, where the spec taps ReLU(BN(.)) of them (the
  same count and shapes), and VGG has no blocks (use patterns, e.g. `'block*_bn*'`).
Under `jit` the interceptor is a trace-time hook: the compiled program holds only the arrays
returned.

Every tap becomes a channels-last `B x H x W x C` map: a block that returns a tuple contributes
its first array; `B x N x D` tokens lose their prefix tokens (class, distillation, register
tokens: `prefix_tokens`, by default the module's `num_prefix_tokens` attribute, else 1 when its
`classifier == 'token'`, else 0) and become a grid: `grid` if given, else the patch grid of the
input image (the patch size p with (H/p) * (W/p) tokens), else sqrt(N) when square; `B x D`
becomes `B x 1 x 1 x D`. A grid that cannot be known is an error that asks for `grid`.
"""
import dataclasses
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.models.taps import Tap

TapSpec = Union[str, Sequence[str]]


def _glob(pattern: str) -> 're.Pattern':
  """A glob over '/'-separated module paths: `*` and `?` stay within one path component,
  `**` crosses components, `[...]` is a character class."""
  out, i = [], 0
  while i < len(pattern):
    if pattern.startswith('**', i):
      out.append('.*')
      i += 2
    elif pattern[i] == '*':
      out.append('[^/]*')
      i += 1
    elif pattern[i] == '?':
      out.append('[^/]')
      i += 1
    elif pattern[i] == '[' and ']' in pattern[i + 1:]:
      end = pattern.index(']', i + 1)
      body = pattern[i + 1:end]
      out.append('[' + ('^' + body[1:] if body.startswith('!') else body) + ']')
      i = end + 1
    else:
      out.append(re.escape(pattern[i]))
      i += 1
  return re.compile(''.join(out) + r'\Z')


def _path(module: nn.Module) -> str:
  return '/'.join(str(p) for p in module.path)


def _first_array(out):
  for leaf in jax.tree_util.tree_leaves(out):
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
      return leaf
  return None


def _logits(out):
  return out[0] if isinstance(out, (tuple, list)) else out


@dataclasses.dataclass
class _Call:
  path: str
  cls: type
  depth: int
  children: int = 0
  shape: Tuple[int, ...] = ()


def _is_flax_layer(cls: type) -> bool:
  return cls.__module__.split('.')[0] == 'flax'


class _Recorder:
  """Interceptor that records every submodule `__call__` (path, class, nesting, output)."""

  def __init__(self, wanted: Optional[Sequence[str]] = None):
    self.calls: List[_Call] = []
    self.outputs: List[Tuple[str, Any]] = []
    self._wanted = None if wanted is None else set(wanted)
    self._stack: List[_Call] = []

  def __call__(self, next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = _path(context.module)
    if self._wanted is not None:  # applying: keep only the resolved taps' outputs
      out = next_fun(*args, **kwargs)
      if path in self._wanted:
        self.outputs.append((path, _first_array(out)))
      return out
    call = _Call(path, type(context.module), len(self._stack))
    if self._stack:
      self._stack[-1].children += 1
    self.calls.append(call)
    self._stack.append(call)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      self._stack.pop()
    leaf = _first_array(out)
    call.shape = tuple(leaf.shape) if leaf is not None else ()
    return out


def _sown(intermediates, prefix: str = '') -> List[Tuple[str, Any]]:
  """(path, first array) of each value stored with `sow('intermediates', name, x)`, in the
  order they were sown (dicts keep insertion order; a sown value is a tuple of calls)."""
  found = []
  for key, value in intermediates.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if hasattr(value, 'items'):
      found += _sown(value, path)
    else:
      for leaf in (value if isinstance(value, (tuple, list)) else (value,)):
        found.append((path, _first_array(leaf)))
  return found


@dataclasses.dataclass(frozen=True, eq=False)
class Tapped:
  """A linen module with feature taps; build it with `tap(...)`, not directly."""
  module: nn.Module
  spec: TapSpec = 'auto'
  prefix_tokens: Optional[int] = None
  grid: Optional[Tuple[int, int]] = None
  paths: Tuple[str, ...] = ()        # resolved by `resolve`
  sources: Tuple[str, ...] = ()      # 'call' or 'sow', per tap
  grids: Tuple[Optional[Tuple[int, int, int]], ...] = ()  # (prefix, h, w) for token taps
  stages: Tuple[int, ...] = ()

  @property
  def resolved(self) -> bool:
    return bool(self.paths)

  def taps(self) -> Tuple[Tap, ...]:
    if not self.resolved:
      raise ValueError('taps are found by tracing the model once: call resolve(image_shape).')
    return tuple(Tap(p, s) for p, s in zip(self.paths, self.stages))

  def _prefix(self) -> int:
    if self.prefix_tokens is not None:
      return int(self.prefix_tokens)
    count = getattr(self.module, 'num_prefix_tokens', None)
    if count is not None:
      return int(count)
    return 1 if getattr(self.module, 'classifier', None) == 'token' else 0

  def _token_grid(self, path: str, shape, image_hw) -> Tuple[int, int, int]:
    prefix = self._prefix()
    n = shape[1] - prefix
    hint = (f'set its grid (config: taps_grid=(h, w)) and prefix tokens (taps_prefix_tokens, '
            f'now {prefix})')
    if self.grid:
      h, w = self.grid
      if h * w != n:
        raise ValueError(f'tap {path}: {shape[1]} tokens - {prefix} prefix tokens = {n} do not '
                         f'fill the grid {h}x{w}; {hint}.')
      return prefix, h, w
    height, width = image_hw
    for p in range(1, min(height, width) + 1):
      if height % p == 0 and width % p == 0 and (height // p) * (width // p) == n:
        return prefix, height // p, width // p
    side = math.isqrt(max(n, 0))
    if n > 0 and side * side == n:
      return prefix, side, side
    raise ValueError(f'tap {path}: cannot lay {shape[1]} tokens ({prefix} prefix) on a grid '
                     f'for a {height}x{width} image; {hint}.')

  def resolve(self, image_shape: Sequence[int]) -> 'Tapped':
    """Finds the taps by one abstract trace on `image_shape` (H, W, C) images."""
    recorder = _Recorder()
    images = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32)

    sown_paths = []

    def trace(images):
      variables = self.module.init(jax.random.PRNGKey(0), images, False)
      with nn.intercept_methods(recorder):
        out, state = self.module.apply(variables, images, False, mutable=['intermediates'])
      sown = _sown(state.get('intermediates', {}))  # in sowing order (a traced dict keeps it)
      sown_paths.extend(p for p, _ in sown)
      return _logits(out), [leaf for _, leaf in sown]

    logits, sown_leaves = jax.eval_shape(trace, images)
    if not hasattr(logits, 'shape') or len(logits.shape) != 2:
      raise ValueError(f'{type(self.module).__name__} must return logits B x classes (or '
                       f'(logits, anything)); it returned {logits!r}.')
    sown = list(zip(sown_paths, sown_leaves))
    calls = [c for c in recorder.calls if c.path]  # the root's own call has no path
    candidates: List[Tuple[str, str, Tuple[int, ...]]] = []  # (source, path, shape)
    if isinstance(self.spec, str) and self.spec == 'auto':
      chosen = _auto_blocks(calls)
      if not chosen and sown:  # e.g. an NNX model through the bridge: what it sows
        candidates = [('sow', path, tuple(leaf.shape)) for path, leaf in sown]
      elif not chosen:
        raise ValueError('taps="auto" found no repeated blocks (classes called at least twice '
                         'that call two or more submodules). Give patterns over these module '
                         f'paths: {_listing(calls, sown)}.')
      else:
        candidates = [('call', c.path, c.shape) for c in chosen]
    else:
      patterns = [self.spec] if isinstance(self.spec, str) else list(self.spec)
      globs = [_glob(p) for p in patterns]
      for c in calls:
        if any(g.match(c.path) for g in globs):
          candidates.append(('call', c.path, c.shape))
      for path, leaf in sown:
        if any(g.match(path) for g in globs):
          candidates.append(('sow', path, tuple(leaf.shape)))
      if not candidates:
        raise ValueError(f'tap patterns {patterns} match no module. Module paths: '
                         f'{_listing(calls, sown)}.')
    paths, sources, grids, stages = [], [], [], []
    last_hw, stage = None, 0
    for source, path, shape in candidates:
      if len(shape) not in (2, 3, 4):
        raise ValueError(f'tap {path} returns shape {shape}; a tap must be B x H x W x C, '
                         'B x N x D tokens or B x D.')
      grid = self._token_grid(path, shape, image_shape[:2]) if len(shape) == 3 else None
      hw = shape[1:3] if len(shape) == 4 else (grid[1:] if grid else (1, 1))
      if hw != last_hw:
        stage, last_hw = stage + 1, hw
      name = path if path not in paths else f'{path}#{paths.count(path) + 1}'
      paths.append(name)
      sources.append(source)
      grids.append(grid)
      stages.append(stage)
    return dataclasses.replace(self, paths=tuple(paths), sources=tuple(sources),
                               grids=tuple(grids), stages=tuple(stages))

  def init(self, rngs, images, train: bool = False, **kwargs):
    """The wrapped module's own variables."""
    return self.module.init(rngs, images, train, **kwargs)

  def apply(self, variables, images, train: bool = False, *, mutable=False, **kwargs):
    """Like the module's `apply`, returning `((logits, features), ...)` as the zoo does."""
    if not self.resolved:
      raise ValueError('call resolve(image_shape) before apply.')
    call_paths = [p.split('#')[0] for p, s in zip(self.paths, self.sources) if s == 'call']
    recorder = _Recorder(wanted=call_paths)
    want_sown = 'sow' in self.sources
    asked = mutable
    if want_sown:  # sown values come back in the 'intermediates' collection
      mutable = (['intermediates'] if mutable is False else
                 sorted(set([mutable] if isinstance(mutable, str) else mutable) |
                        {'intermediates'}))
    with nn.intercept_methods(recorder):
      result = self.module.apply(variables, images, train, mutable=mutable, **kwargs)
    out, state = result if mutable is not False else (result, None)
    if state is not None:
      state = dict(state)
    by_path: Dict[str, List[Any]] = {}
    for path, leaf in recorder.outputs:
      by_path.setdefault(path, []).append(leaf)
    if want_sown:
      for path, leaf in _sown(state.pop('intermediates', {})):
        by_path.setdefault(path, []).append(leaf)
    features = []
    for name, grid in zip(self.paths, self.grids):
      path = name.split('#')[0]
      x = by_path[path].pop(0)
      if grid is not None:
        prefix, h, w = grid
        x = x[:, prefix:].reshape(x.shape[0], h, w, x.shape[-1])
      elif x.ndim == 2:
        x = x[:, None, None, :]
      features.append(x)
    logits = _logits(out).astype(jnp.float32)
    result = (logits, tuple(features))
    return (result, state) if asked is not False else result


def _auto_blocks(calls: List[_Call]) -> List[_Call]:
  by_class: Dict[type, List[_Call]] = {}
  for c in calls:
    if c.children >= 2 and not _is_flax_layer(c.cls) and c.shape:
      by_class.setdefault(c.cls, []).append(c)
  groups = [g for g in by_class.values() if len(g) >= 2]
  if not groups:
    return []
  return max(groups, key=lambda g: (len(g), -min(c.depth for c in g)))


def _listing(calls: List[_Call], sown) -> str:
  seen = []
  for c in calls:
    if c.path not in seen:
      seen.append(c.path)
  seen += [p for p, _ in sown]
  shown = ', '.join(seen[:60])
  return shown + (f', ... ({len(seen)} in all)' if len(seen) > 60 else '')


def tap(module: nn.Module, taps: TapSpec = 'auto', *, prefix_tokens: Optional[int] = None,
        grid: Optional[Tuple[int, int]] = None,
        image_shape: Optional[Sequence[int]] = None) -> Tapped:
  """Wraps `module` with feature taps (see the module docstring); resolved now if
  `image_shape` (H, W, C) is given, else call `.resolve(image_shape)` before use."""
  if not isinstance(module, nn.Module):
    raise TypeError(f'tap() takes a flax.linen Module (NNX: flax.nnx.bridge.to_linen), got '
                    f'{type(module).__name__}.')
  if not isinstance(taps, str):
    taps = tuple(taps)
    if not taps or not all(isinstance(p, str) for p in taps):
      raise ValueError(f"taps must be 'auto' or a non-empty list of patterns, got {taps!r}.")
  tapped = Tapped(module, taps, prefix_tokens, tuple(grid) if grid else None)
  return tapped.resolve(image_shape) if image_shape is not None else tapped

"""Feature taps on any linen module, without editing or subclassing it.

`tap(module, taps='auto')` wraps a linen module whose `__call__` returns logits (or
`(logits, anything)`) into an object with the zoo's contract: `init` / `apply(variables,
images, train)` return `(logits, features)` and `taps()` names the features. The train flag
reaches the module as its `__call__` declares it (see calling.py: keyword-only, `deterministic`,
none at all, ...). Its variables are the module's own, so checkpoints of the bare module load
unchanged.

How the taps are found: one abstract trace (`jax.eval_shape`) of the module with a Flax method
interceptor (`nn.intercept_methods`) records every submodule call: its path, class and output.
- A list of patterns (globs over '/'-joined module paths, e.g. `'layer*'`,
  `'Transformer/encoderblock_*'`; `*` and `?` stay within one path component, `**` crosses
  them) taps every call whose path matches one of them, in network (call) order. Values that
  the module stores with `self.sow('intermediates', name, x)` are matched too, as `path/name`
  (NNX modules through `flax.nnx.bridge.to_linen` sow this way), and so are the arrays it
  returns besides its logits, as `returned:key/key` (e.g. a per-layer dict).
- `'auto'` taps the outputs of the network's outermost repeated blocks. The rule: among module
  classes that are *blocks* (a call that itself calls two or more submodules; Flax's own layers
  and leaf layers never qualify) and are called at least twice, drop a class that is a part of
  another (some of its calls inside that class's calls, at most one in each: a transformer
  block's MLP, even when a MAP head calls it once more); then the class with the most calls; on
  a tie, the one nearer the root. Residual blocks, transformer encoder blocks and ConvNeXt
  blocks are found this way. A module with no such blocks that sows intermediates (an NNX model
  through the bridge is one linen module) is tapped at what it sows. On afd_jax's zoo this
  gives exactly the taps of docs/method.md for the CIFAR and ImageNet ResNets except resnet110
  (the spec taps every second block; auto taps all 54). For the WRNs auto taps the blocks' raw
  outputs, where the spec taps ReLU(BN(.)) of them (the same count and shapes), and VGG has no
  blocks (use patterns, e.g. `'block*_bn*'`).
- A call inside a transform of the model's own (blocks under `nn.scan`, `nn.remat`) has an
  output that exists only inside that transform: it is never tapped, and asking for it is an
  error that lists what can be (modules outside it, what the model returns).
Under `jit` the interceptor is a trace-time hook: the compiled program holds only the arrays
returned.

Every tap becomes a channels-last `B x H x W x C` map: a block that returns a tuple contributes
its first array; `B x N x D` tokens lose their prefix tokens (class, distillation, register
tokens: `prefix_tokens`, by default the module's `num_prefix_tokens` attribute, else 1 when its
`classifier == 'token'` or `pool_type == 'tok'`, else 0) and become a grid: `grid` if given,
else the patch grid of the input image (the patch size p with (H/p) * (W/p) tokens), else
sqrt(N) when square; `B x D` becomes `B x 1 x 1 x D`. A grid that cannot be known is an error
that asks for `grid`.
"""
import collections
import dataclasses
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import tracers

from afd_jax.layers import at_least_f32
from afd_jax.models.calling import Calling, axis_names_of
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
  ancestors: Tuple[int, ...] = ()  # indices of the enclosing calls in the recorder's list
  inner: bool = False  # inside a transform of the model's own (nn.scan, nn.remat): untappable
  children: int = 0
  shape: Tuple[int, ...] = ()


def _is_flax_layer(cls: type) -> bool:
  return cls.__module__.split('.')[0] == 'flax'


class _Recorder:
  """Interceptor that records every submodule `__call__` (path, class, nesting, output)."""

  def __init__(self, wanted: Optional[Sequence[str]] = None):
    self.calls: List[_Call] = []
    self.outputs: List[Tuple[str, Any]] = []
    self.modules: List[nn.Module] = []
    self._wanted = None if wanted is None else set(wanted)
    self._stack: List[int] = []
    self._root_trace = None

  def __call__(self, next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = _path(context.module)
    if self._wanted is not None:  # applying: keep only the resolved taps' outputs
      out = next_fun(*args, **kwargs)
      if path in self._wanted:
        self.outputs.append((path, _first_array(out)))
      return out
    if self._root_trace is None:
      self._root_trace = tracers.current_trace()
    call = _Call(path, type(context.module), len(self._stack), tuple(self._stack),
                 tracers.current_trace() != self._root_trace)
    if self._stack:
      self.calls[self._stack[-1]].children += 1
    self.calls.append(call)
    self.modules.append(context.module)
    self._stack.append(len(self.calls) - 1)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      self._stack.pop()
    leaf = _first_array(out)
    call.shape = tuple(leaf.shape) if leaf is not None else ()
    return out


RETURNED = 'returned:'  # the path prefix of what a module returns besides its logits


def _returned(out) -> List[Tuple[str, Any]]:
  """('returned:a/b', array) of each array in `(logits, extras)` a module returns, in order."""
  if not isinstance(out, (tuple, list)) or len(out) < 2:
    return []
  found = []

  def walk(value, path):
    if hasattr(value, 'items'):
      for key, item in value.items():
        walk(item, f'{path}/{key}' if path else str(key))
    elif isinstance(value, (tuple, list)):
      for i, item in enumerate(value):
        walk(item, f'{path}/{i}' if path else str(i))
    elif hasattr(value, 'shape') and hasattr(value, 'dtype'):
      found.append((RETURNED + (path or '1'), value))

  walk(out[1] if len(out) == 2 else list(out[1:]), '')
  return found


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
  calling: Calling = Calling()       # how `train` reaches the module (see calling.py)

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
    token_pool = (getattr(self.module, 'classifier', None) == 'token' or
                  getattr(self.module, 'pool_type', None) == 'tok')
    return 1 if token_pool else 0

  def _token_grid(self, path: str, shape, image_hw) -> Tuple[int, int, int]:
    prefix = self._prefix()
    n = shape[1] - prefix
    hint = (f'set its grid and prefix tokens: config.student.token_grid=(h, w) and '
            f'config.student.prefix_tokens (class and register tokens, now {prefix}'
            f'{_prefix_guess(shape[1], image_hw)}); for the teacher config.teacher.token_grid '
            'and config.teacher.prefix_tokens')
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
    calls, values, axis_names = self._trace(tuple(image_shape))
    tapped = dataclasses.replace(
        self, calling=dataclasses.replace(self.calling, axis_names=axis_names))
    return tapped._laid_out(self._candidates(calls, values), image_shape)

  def _trace(self, image_shape):
    """(submodule calls, values (source 'sow' or 'returned', path, array), pmap axis names) of
    an eval-mode apply; a train-mode apply is traced too, so that what only training runs fails
    here, in one line."""
    recorder, named, found = _Recorder(), [], {}
    dropout = {'dropout': jax.random.PRNGKey(1)}
    images = jax.ShapeDtypeStruct((2,) + image_shape, jnp.float32)

    def trace(images):
      variables = self.init(jax.random.PRNGKey(0), images, False)
      with nn.intercept_methods(recorder):
        out, state = self.module.apply(variables, images, method=self.calling.method(False),
                                       mutable=['intermediates'], rngs=dropout)
      values = ([('sow', p, x) for p, x in _sown(state.get('intermediates', {}))] +
                [('returned', p, x) for p, x in _returned(out)])  # in order (traced dicts keep it)
      named.extend((source, path) for source, path, _ in values)
      found['axes'] = axis_names_of(recorder.modules)
      calling = dataclasses.replace(self.calling, axis_names=found['axes'])
      with calling.unbound_axes():
        self.module.apply(variables, images, method=calling.method(True), mutable=True,
                          rngs=dropout)
      return _logits(out), [leaf for _, _, leaf in values]

    try:
      logits, leaves = jax.eval_shape(trace, images)
    except NameError as e:  # a collective over an axis that no layer's `axis_name` declares
      axis = re.search(r'unbound axis name: ([^\s.]+)', str(e))
      if not axis:
        raise
      raise ValueError(f'{type(self.module).__name__} runs a collective over the pmap axis '
                       f'{axis.group(1)!r}, which none of its layers declares as axis_name; '
                       'remove it (under jit each layer already sees the global batch), or '
                       f"leave the averaging to a layer that declares it (axis_name="
                       f"{axis.group(1)!r}, as nn.BatchNorm takes).") from None
    if not hasattr(logits, 'shape') or len(logits.shape) != 2:
      raise ValueError(f'{type(self.module).__name__} must return logits B x classes (or '
                       f'(logits, anything)); it returned {logits!r}.')
    return recorder.calls, [n + (x,) for n, x in zip(named, leaves)], found['axes']

  def _candidates(self, all_calls: List[_Call], values) -> List[Tuple[str, str, Tuple[int, ...]]]:
    """(source, path, shape) of each tap, in network order."""
    calls = [c for c in all_calls if c.path]  # the root's own call has no path
    if isinstance(self.spec, str) and self.spec == 'auto':
      chosen = _auto_blocks(all_calls)
      if chosen:
        return [('call', c.path, c.shape) for c in chosen]
      sown = [('sow', path, tuple(x.shape)) for source, path, x in values if source == 'sow']
      if sown:  # e.g. an NNX model through the bridge: what it sows
        return sown
      raise ValueError(_no_blocks_message(self.module, all_calls, values))
    patterns = [self.spec] if isinstance(self.spec, str) else list(self.spec)
    globs = [_glob(p) for p in patterns]
    matches = lambda path, source='call': any(  # returned values: 'returned:...' patterns
        g.match(path) for g, p in zip(globs, patterns)
        if source != 'returned' or p.startswith(RETURNED))
    inner = [c.path for c in calls if c.inner and matches(c.path)]
    outer = [c for c in calls if not c.inner]
    if inner:
      raise ValueError(f'tap patterns {patterns} match {inner[0]}, {_INNER}. Paths that can '
                       f'be tapped: {_listing(outer, values)}.')
    candidates = [('call', c.path, c.shape) for c in outer if matches(c.path)]
    candidates += [(source, path, tuple(x.shape)) for source, path, x in values
                   if matches(path, source)]
    if not candidates:
      raise ValueError(f'tap patterns {patterns} match no module. Module paths: '
                       f'{_listing(outer, values)}.')
    return candidates

  def _laid_out(self, candidates, image_shape) -> 'Tapped':
    """`self` with the taps' names, sources, token grids and stages."""
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
    """The wrapped module's own variables. A key `rngs` seeds a 'dropout' stream too (a
    bridged NNX model's Dropout takes it when built; the parameters do not depend on it)."""
    if not isinstance(rngs, dict):
      rngs = {'params': rngs, 'dropout': jax.random.fold_in(rngs, 1)}
    with self.calling.unbound_axes():
      return self.module.init(rngs, images, method=self.calling.method(train), **kwargs)

  def apply(self, variables, images, train: bool = False, *, mutable=False, **kwargs):
    """Like the module's `apply`, returning `((logits, features), ...)` as the zoo does."""
    if not self.resolved:
      raise ValueError('call resolve(image_shape) before apply.')
    call_paths = [p.split('#')[0] for p, s in zip(self.paths, self.sources) if s == 'call']
    want_sown = 'sow' in self.sources
    asked = mutable
    if want_sown:  # sown values come back in the 'intermediates' collection
      mutable = (['intermediates'] if mutable is False else
                 sorted(set([mutable] if isinstance(mutable, str) else mutable) |
                        {'intermediates'}))
    recorder = _Recorder(wanted=call_paths)
    with self.calling.unbound_axes(), nn.intercept_methods(recorder):
      result = self.module.apply(variables, images, method=self.calling.method(train),
                                 mutable=mutable, **kwargs)
    out, state = result if mutable is not False else (result, None)
    if state is not None:
      state = dict(state)
    by_path: Dict[str, List[Any]] = {}
    for path, leaf in recorder.outputs:
      by_path.setdefault(path, []).append(leaf)
    if want_sown:
      for path, leaf in _sown(state.pop('intermediates', {})):
        by_path.setdefault(path, []).append(leaf)
    if 'returned' in self.sources:
      for path, leaf in _returned(out):
        by_path.setdefault(path, []).append(leaf)
    features = [_as_map(by_path[name.split('#')[0]].pop(0), grid)
                for name, grid in zip(self.paths, self.grids)]
    result = (at_least_f32(_logits(out)), tuple(features))
    return (result, state) if asked is not False else result


_INNER = ('which runs inside a transform of the model\'s own (nn.scan, nn.remat): its output '
          'exists only inside it; build the model unscanned (e.g. its scan option off, under '
          'config.student.kwargs or config.teacher.kwargs), or give patterns '
          '(config.student.taps or config.teacher.taps) over modules outside it or over what '
          'the model returns besides its logits (returned:...)')


def _as_map(x, grid):
  """A tap's array as `B x H x W x C`: token grids without their prefix, vectors 1 x 1."""
  if grid is not None:
    prefix, h, w = grid
    return x[:, prefix:].reshape(x.shape[0], h, w, x.shape[-1])
  return x[:, None, None, :] if x.ndim == 2 else x


def _no_blocks_message(module, calls: List[_Call], values) -> str:
  inner = _auto_blocks(calls, inner=True)
  if inner:
    return (f'taps="auto" found repeated blocks only at {inner[0].path}, {_INNER}. Paths that '
            f'can be tapped: {_listing([c for c in calls if c.path and not c.inner], values)}.')
  if not [c for c in calls if c.path]:  # one linen module, e.g. an NNX model through the bridge
    return (f'taps="auto" found no submodules in {type(module).__name__} to tap and nothing '
            "sown: an NNX model (flax.nnx.bridge.to_linen) is tapped at what it sows: add "
            "self.sow(nnx.Intermediate, 'block1', x) after each block in its __call__, and "
            'leave config.student.taps (config.teacher.taps) at auto or name them.')
  return ('taps="auto" found no repeated blocks (classes called at least twice that call two '
          'or more submodules). Give patterns (config.student.taps or config.teacher.taps) over '
          f'these module paths: {_listing([c for c in calls if c.path], values)}.')


def _prefix_guess(tokens: int, image_hw) -> str:
  """', e.g. 1: N tokens = n patches of p px + 1' when a few extra tokens fill a patch grid."""
  height, width = image_hw
  for extra in range(1, 9):
    for p in range(1, min(height, width) + 1):
      if height % p == 0 and width % p == 0 and (height // p) * (width // p) == tokens - extra:
        return (f'; {extra} would fit: {tokens} tokens = {tokens - extra} patches of {p} px '
                f'+ {extra}')
  return ''


def _auto_blocks(calls: List[_Call], inner: bool = False) -> List[_Call]:
  """The outermost repeated blocks (the module docstring's rule) among all recorded `calls`;
  `inner`: among those inside a transform of the model's own instead."""
  by_class: Dict[type, List[int]] = {}
  for i, c in enumerate(calls):
    if (c.path and c.inner == inner and c.children >= 2 and not _is_flax_layer(c.cls)
        and c.shape):
      by_class.setdefault(c.cls, []).append(i)
  groups = [ids for ids in by_class.values() if len(ids) >= 2]
  kept = [ids for ids in groups if not any(_part_of(calls, ids, other)
                                           for other in groups if other is not ids)]
  if not kept:
    return []
  best = max(kept, key=lambda ids: (len(ids), -min(calls[i].depth for i in ids)))
  return [calls[i] for i in best]


def _part_of(calls: List[_Call], ids: List[int], outer: List[int]) -> bool:
  """Are the calls `ids` a part of the blocks `outer` (some inside them, at most one in each,
  e.g. a transformer block's MLP, which a MAP head calls once more)?"""
  outer_ids, counts = set(outer), collections.Counter()
  for i in ids:
    counts.update(a for a in calls[i].ancestors if a in outer_ids)
  return bool(counts) and max(counts.values()) == 1


def _listing(calls: List[_Call], values) -> str:
  seen = []
  for c in calls:
    if c.path not in seen:
      seen.append(c.path)
  seen += [path for _, path, _ in values]
  shown = ', '.join(seen[:60])
  return shown + (f', ... ({len(seen)} in all)' if len(seen) > 60 else '')


def tap(module: nn.Module, taps: TapSpec = 'auto', *, prefix_tokens: Optional[int] = None,
        grid: Optional[Tuple[int, int]] = None, image_shape: Optional[Sequence[int]] = None,
        train_arg: str = '') -> Tapped:
  """Wraps `module` with feature taps (see the module docstring); resolved now if
  `image_shape` (H, W, C) is given, else call `.resolve(image_shape)` before use. `train_arg`:
  how the train flag reaches the module ('' = from its `__call__`; see `calling.Calling`)."""
  if not isinstance(module, nn.Module):
    raise TypeError(f'tap() takes a flax.linen Module (NNX: flax.nnx.bridge.to_linen), got '
                    f'{type(module).__name__}.')
  if not isinstance(taps, str):
    taps = tuple(taps)
    if not taps or not all(isinstance(p, str) for p in taps):
      raise ValueError(f"taps must be 'auto' or a non-empty list of patterns, got {taps!r}.")
  tapped = Tapped(module, taps, prefix_tokens, tuple(grid) if grid else None,
                  calling=Calling.of(module, train_arg))
  return tapped.resolve(image_shape) if image_shape is not None else tapped

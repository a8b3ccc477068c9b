"""Attention-based Feature Distillation (Ji, Heo and Park, AAAI 2021): the loss of docs/method.md.

A meta-network turns every teacher tap into a query and every student tap into a key; a
per-sample softmax over student layers weighs the distance between every (teacher, student)
pair of spatial attention maps. The work is vectorised, because on an accelerator a small
operation costs its launch: consecutive taps of one width share one batched projection and
batch norm, there is one distance tensor per distinct teacher resolution, and student maps are
pooled once per (run of one resolution, teacher resolution).
"""
import math
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.pooling import adaptive_avg_pool2d
from afd_jax.layers import (BatchNorm, at_least_f32, batch_norm_group_count, check_feature_pair,
                            linear_bias_init, linear_kernel_init, mean_over_groups,
                            running_update, spatial_mean, xavier_normal)


def runs(keys: Sequence) -> List[Tuple[int, int]]:
  """`(first, last)` of each maximal run of equal consecutive `keys`, in order."""
  out: List[Tuple[int, int]] = []
  for i, k in enumerate(keys):
    if out and keys[out[-1][0]] == k:
      out[-1] = (out[-1][0], i)
    else:
      out.append((i, i))
  return out


def run_name(prefix: str, first: int, last: int) -> str:
  """The parameter group of taps `first..last`: `queries_0to5`, `keys_2to2`."""
  return f'{prefix}_{first}to{last}'


class StackedLinearBN(nn.Module):
  """`count` of the official `nn_bn_relu` (Linear -> 1-D batch norm (-> ReLU)) over inputs of
  one width, as one batched Linear and one batch norm: `count x B x C -> B x count x d`.

  `linear/kernel` is `count x C x d` and `linear/bias` `count x d` (tap i's nn.Linear in row
  i); the batch norm's parameters and statistics are those of the `count * d` outputs, tap
  i's in `[i * d, (i + 1) * d)`. Each output column is normalised over the batch alone, as
  one BatchNorm1d per tap does, so this is `count` LinearBNs computed together.
  """
  features: int
  relu: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    count, batch, fan_in = x.shape  # tap-major: the batched matrix product's own layout
    kernel, bias = _StackedLinearParams(count, self.features, name='linear')(fan_in)
    z = jnp.swapaxes(jnp.einsum('nbc,ncd->nbd', x, kernel), 0, 1) + bias
    z = BatchNorm(name='bn')(z.reshape(batch, count * self.features), train)
    z = z.reshape(batch, count, self.features)
    return nn.relu(z) if self.relu else z


class _StackedLinearParams(nn.Module):
  """`count` nn.Linear(fan_in, features) parameters (PyTorch init), stacked on a first axis."""
  count: int
  features: int

  @nn.compact
  def __call__(self, fan_in: int):
    kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform',
                                                   batch_axis=(0,))
    kernel = self.param('kernel', kernel_init, (self.count, fan_in, self.features), jnp.float32)
    bias = self.param('bias', linear_bias_init(fan_in), (self.count, self.features),
                      jnp.float32)
    return kernel, bias


class _LinearParams(nn.Module):
  """The parameters of an nn.Linear (PyTorch init), for code that uses them other than x W + b."""
  features: int

  @nn.compact
  def __call__(self, fan_in: int):
    kernel = self.param('kernel', linear_kernel_init, (fan_in, self.features), jnp.float32)
    bias = self.param('bias', linear_bias_init(fan_in), (self.features,), jnp.float32)
    return kernel, bias


class _BatchNormParams(nn.Module):
  """The parameters and running statistics of a BatchNorm (as `afd_jax.layers.BatchNorm`)."""
  features: int

  @nn.compact
  def __call__(self):
    scale = self.param('scale', nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (self.features,), jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, (self.features,), jnp.float32)
    return scale, bias, mean, var


class BilinearLogits(nn.Module):
  """`<BN(Linear(key_m))[n], query_n>` for every (teacher n, student m): the official
  `bilinear` nn_bn_relu (Linear d -> T*d, BatchNorm over the B*S rows, no ReLU) contracted
  with the queries, without materialising its `B x S x T x d` output.

  With z = k W + c and batch statistics, BN(z) = scale * (k - mean_k) W + beta, where the
  variance of column j is w_j' Cov(k) w_j; so the query is pushed through W instead
  (`B x T x d x d` work rather than `B x S x T x d x d`). Same parameters, same running
  statistics (PyTorch's momentum, unbiased variance), same values up to rounding.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, key: jax.Array, query: jax.Array, train: bool) -> jax.Array:
    batch, s, d = key.shape
    t = query.shape[1]
    kernel, bias = _LinearParams(t * d, name='linear')(d)
    gamma, beta, running_mean, running_var = _BatchNormParams(t * d, name='bn')()
    if train:  # statistics per group of examples (one group: the whole batch), see BatchNorm
      groups = batch_norm_group_count(batch)
      if groups == 1:  # the global batch norm, computed exactly as it always was
        rows = key.reshape(batch * s, d)
        key_mean = jnp.mean(rows, axis=0)
        centred = rows - key_mean
        covariance = centred.T @ centred / rows.shape[0]
        mean = key_mean @ kernel + bias                                    # T*d
        var = jnp.sum(kernel * (covariance @ kernel), axis=0)
        batch_mean, batch_var = mean, var
      else:
        rows = key.reshape(groups, batch // groups * s, d)
        key_mean = jnp.mean(rows, axis=1, keepdims=True)                   # G x 1 x d
        centred = rows - key_mean
        covariance = jnp.einsum('gri,grj->gij', centred, centred) / rows.shape[1]
        mean = key_mean[:, 0] @ kernel + bias                              # G x T*d
        var = jnp.sum(kernel * jnp.einsum('gij,jk->gik', covariance, kernel), axis=1)
        batch_mean, batch_var = mean_over_groups(mean, groups), mean_over_groups(var, groups)
      if not self.is_initializing():
        n = batch // groups * s
        running_mean.value = running_update(running_mean.value, batch_mean, self.momentum)
        running_var.value = running_update(running_var.value, batch_var * n / max(n - 1, 1),
                                           self.momentum)
      inputs, offset = centred.reshape(batch, s, d), jnp.zeros((t, d), key.dtype)
      scale = gamma * jax.lax.rsqrt(var + self.epsilon)
      scale = (scale.reshape(t, d) if groups == 1 else                     # T x d, or B x T x d
               jnp.repeat(scale.reshape(groups, t, d), batch // groups, axis=0))
    else:
      mean, var = running_mean.value, running_var.value
      inputs, offset = key, (bias - mean).reshape(t, d)
      scale = (gamma * jax.lax.rsqrt(var + self.epsilon)).reshape(t, d)
    weighted_query = scale * query                                         # B x T x d
    pushed = jnp.einsum('inj,bnj->bni', kernel.reshape(d, t, d), weighted_query)
    constant = (jnp.einsum('bnj,nj->bn', weighted_query, offset) +
                jnp.einsum('bnj,nj->bn', query, beta.reshape(t, d)))
    return jnp.einsum('bmi,bni->bnm', inputs, pushed) + constant[:, :, None]


def spatial_energy(f: jax.Array) -> jax.Array:
  """`mean_c(f ** 2)`: B x H x W x C -> B x H x W, in float32 or wider."""
  f = at_least_f32(f)
  return jnp.mean(f * f, axis=-1)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """PyTorch's F.normalize: x / max(||x||_2, 1e-12). (The clamp is applied before the square
  root, which gives the same value and keeps the gradient of an all-zero map finite.)"""
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-24))


def project(prefix: str, features: Sequence[jax.Array], qk_dim: int, relu: bool,
            train: bool) -> jax.Array:
  """`B x L x qk_dim`: every tap's spatial mean through its LinearBN, one StackedLinearBN per
  run of consecutive taps of one width (`<prefix>_<first>to<last>`)."""
  out = []
  for lo, hi in runs([f.shape[-1] for f in features]):
    means = jnp.stack([spatial_mean(f) for f in features[lo:hi + 1]])  # n x B x C
    out.append(StackedLinearBN(qk_dim, relu, name=run_name(prefix, lo, hi))(means, train))
  return out[0] if len(out) == 1 else jnp.concatenate(out, 1)


def energy_runs(features: Sequence[jax.Array]) -> List[Tuple[int, int, jax.Array]]:
  """`(first, last, B x n x H x W)`: the energy maps of each run of consecutive taps of one
  resolution, stacked. Each map is reduced on its own: stacking the feature maps first would
  copy them all (on a CPU that made the AFD step about 10 % slower)."""
  return [(lo, hi, jnp.stack([spatial_energy(f) for f in features[lo:hi + 1]], 1))
          for lo, hi in runs([f.shape[1:3] for f in features])]


def pair_distances(student_features: Sequence[jax.Array],
                   teacher_features: Sequence[jax.Array]) -> jax.Array:
  """`D[b, n, m]`: mean squared difference of normalised attention maps, `B x T x S`.

  Student energy maps are pooled once per (run of one resolution, distinct teacher
  resolution); the distances of one teacher resolution are one broadcast subtraction.
  """
  s_energy = [energy for _, _, energy in energy_runs(student_features)]
  batch = s_energy[0].shape[0]
  resolutions: Dict[Tuple[int, int], List] = OrderedDict()
  for lo, hi, energy in energy_runs(teacher_features):
    resolutions.setdefault(energy.shape[-2:], []).append((lo, hi, energy))
  blocks, t_order = [], []
  for (h, w), group in resolutions.items():
    v_t = jnp.concatenate([e.reshape(batch, -1, h * w) for _, _, e in group], 1)
    v_t = l2_normalize(v_t)                                             # B x T_g x P
    pooled = jnp.concatenate([adaptive_avg_pool2d(e, (h, w)) for e in s_energy], 1)
    v_s = l2_normalize(pooled.reshape(batch, -1, h * w))                # B x S x P
    # The difference itself, not |v_s|^2 + |v_t|^2 - 2 v_s.v_t: that cancels badly when the
    # maps are close, which is where training takes them.
    blocks.append(jnp.mean(jnp.square(v_s[:, None] - v_t[:, :, None]), axis=-1))  # B x T_g x S
    t_order += [n for lo, hi, _ in group for n in range(lo, hi + 1)]
  distances = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)
  if t_order == sorted(t_order):
    return distances
  return distances[:, jnp.array([t_order.index(n) for n in range(len(t_order))])]


class AFD(nn.Module):
  """The AFD loss. Infers T, S and every shape from its inputs.

  `apply(variables, student_features, teacher_features, train, mutable=['batch_stats'])`
  returns `((loss, attention), updates)`: `loss` is L_AFD before the beta weight and
  `attention` is `B x T x S`. Teacher features are constants. The T per-teacher-layer terms
  are sown as `intermediates/per_teacher_layer`.

  Taps are handled in runs: consecutive taps of one width share one batched query
  (`queries_<first>to<last>`) or key (`keys_...`) projection and batch norm, consecutive taps
  of one resolution their pooling and distances, so a step launches a few operations per run
  where it launched them per tap.
  `per_tap_variables` / `stacked_like` convert to and from one LinearBN per tap
  (`query_<n>`, `key_<m>`: the official module's layout).
  """
  qk_dim: int = 128

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool):
    check_feature_pair(student_features, teacher_features)
    teacher_features = [jax.lax.stop_gradient(f) for f in teacher_features]
    t, s, d = len(teacher_features), len(student_features), self.qk_dim
    query = project('queries', teacher_features, d, relu=False, train=train)  # B x T x d
    key = project('keys', student_features, d, relu=True, train=train)        # B x S x d
    bilinear = BilinearLogits(name='bilinear')(key, query, train)              # B x T x S
    p_t = self.param('p_t', xavier_normal, (t, d), jnp.float32)
    p_s = self.param('p_s', xavier_normal, (s, d), jnp.float32)
    logits = (bilinear + p_t @ p_s.T) / math.sqrt(d)
    attention = jax.nn.softmax(logits, axis=-1)                               # B x T x S

    distances = pair_distances(student_features, teacher_features)           # B x T x S
    per_teacher_layer = jnp.mean(jnp.sum(attention * distances, axis=-1), axis=0)
    self.sow('intermediates', 'per_teacher_layer', per_teacher_layer)
    return jnp.sum(per_teacher_layer), attention


_RUN = re.compile(r'^(queries|keys)_(\d+)to(\d+)$')
_TAP = re.compile(r'^(query|key)_(\d+)$')
_SIDES = {'queries': 'query', 'keys': 'key', 'query': 'queries', 'key': 'keys'}


def per_tap_variables(variables: Mapping[str, Any]) -> Dict[str, Any]:
  """AFD variables (`{'params': ..., 'batch_stats': ...}`, or one collection) with one LinearBN
  per tap (`query_<n>/linear/kernel` C x d, `query_<n>/bn/scale` d, ...): the layout of the
  official module, and of afd_jax checkpoints written before the taps were stacked."""
  out: Dict[str, Any] = {}
  for name, value in variables.items():
    m = _RUN.match(name)
    if not m:
      out[name] = per_tap_variables(value) if name in ('params', 'batch_stats') else value
      continue
    first, last = int(m[2]), int(m[3])
    for i in range(last - first + 1):
      out[f'{_SIDES[m[1]]}_{first + i}'] = jax.tree.map(
          lambda leaf, i=i, n=last - first + 1: leaf.reshape((n, -1) + leaf.shape[1:])[i]
          if leaf.ndim == 1 else leaf[i], dict(value))
  return out


def stacked_like(per_tap: Mapping[str, Any], like: Mapping[str, Any]) -> Dict[str, Any]:
  """The inverse of `per_tap_variables`: variables (or one collection, or a tree mirroring
  `params` such as an optimizer's momentum) with one LinearBN per tap, in the run layout of
  `like` (the same tree in the current layout, or its shapes): linear leaves stacked on a new
  first axis, batch-norm leaves concatenated."""
  out: Dict[str, Any] = {}
  for name, value in like.items():
    m = _RUN.match(name)
    if not m:
      out[name] = (stacked_like(per_tap[name], value) if name in ('params', 'batch_stats')
                   else per_tap[name])
      continue
    group = [per_tap[f'{_SIDES[m[1]]}_{n}'] for n in range(int(m[2]), int(m[3]) + 1)]
    out[name] = jax.tree_util.tree_map_with_path(
        lambda path, *leaves: (jnp.concatenate(leaves) if path[0].key == 'bn'
                               else jnp.stack(leaves)), *group)
  return out


def is_per_tap_layout(names) -> bool:
  """Whether a distiller collection with these top-level names holds one LinearBN per tap."""
  return any(_TAP.match(n) for n in names)


registry.register(registry.Method(
    'afd', build=lambda config, setting: AFD(qk_dim=config.afd.qk_dim),
    feature_weight=200.0, logit_weights=(1.0, 0.9),
    taps='every tap of both models: all (teacher, student) pairs, weighed by the attention',
    source='the official AFD recipe (KD 0.9 at T 4, beta 200)', attention=True,
    several_teachers=True,  # the union of the teachers' taps: a term per teacher layer
    older_layout=registry.OlderLayout(is_per_tap_layout, per_tap_variables, stacked_like),
    # ImageNet: the independent port's recipe (docs/method.md): beta 50, no KD.
    recipes={'imagenet': {('*', '*'): {'loss.feature_weight': 50.0, 'loss.kd_weight': 0.0}}}))

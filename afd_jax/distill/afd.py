"""Attention-based Feature Distillation (Ji, Heo and Park, AAAI 2021): the loss of docs/method.md.

A meta-network turns every teacher tap into a query and every student tap into a key; a
per-sample softmax over student layers weighs the distance between every (teacher, student)
pair of spatial attention maps. The work is vectorised: one distance tensor per distinct
teacher resolution, student maps pooled once per (student size, teacher size).
"""
import math
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.pooling import adaptive_avg_pool2d
from afd_jax.layers import (BatchNorm, at_least_f32, batch_norm_group_count, check_feature_pair,
                            linear, linear_bias_init, linear_kernel_init, mean_over_groups,
                            running_update,
                            spatial_mean, xavier_normal)


class LinearBN(nn.Module):
  """Linear -> 1-D batch norm (-> ReLU): the official `nn_bn_relu`."""
  features: int
  relu: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = linear(self.features, x.shape[-1], name='linear')(x)
    x = BatchNorm(name='bn')(x, train)
    return nn.relu(x) if self.relu else x


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


def group_by_shape(shapes: Sequence[Tuple[int, int]]) -> Dict[Tuple[int, int], List[int]]:
  """Indices of `shapes` grouped by distinct value, in order of first appearance."""
  groups: Dict[Tuple[int, int], List[int]] = OrderedDict()
  for i, s in enumerate(shapes):
    groups.setdefault(tuple(s), []).append(i)
  return groups


def pair_distances(student_features: Sequence[jax.Array],
                   teacher_features: Sequence[jax.Array]) -> jax.Array:
  """`D[b, n, m]`: mean squared difference of normalised attention maps, `B x T x S`.

  Student maps are pooled to each distinct teacher resolution once per distinct student
  resolution; the distances of one teacher resolution are one broadcast subtraction.
  """
  s_energy = [spatial_energy(f) for f in student_features]
  s_groups = group_by_shape([e.shape[1:] for e in s_energy])
  s_stacks = {hw: jnp.stack([s_energy[m] for m in idx], 1) for hw, idx in s_groups.items()}
  s_order = [m for idx in s_groups.values() for m in idx]
  s_restore = [s_order.index(m) for m in range(len(student_features))]

  t_groups = group_by_shape([f.shape[1:3] for f in teacher_features])
  blocks, t_order = [], []
  for (h, w), t_idx in t_groups.items():
    batch = teacher_features[0].shape[0]
    v_t = jnp.stack([spatial_energy(teacher_features[n]).reshape(batch, h * w) for n in t_idx], 1)
    v_t = l2_normalize(v_t)                                             # B x T_g x P
    pooled = jnp.concatenate([adaptive_avg_pool2d(x, (h, w)) for x in s_stacks.values()], 1)
    v_s = l2_normalize(pooled[:, jnp.array(s_restore)].reshape(batch, -1, h * w))  # B x S x P
    # The difference itself, not |v_s|^2 + |v_t|^2 - 2 v_s.v_t: that cancels badly when the
    # maps are close, which is where training takes them.
    blocks.append(jnp.mean(jnp.square(v_s[:, None] - v_t[:, :, None]), axis=-1))  # B x T_g x S
    t_order += t_idx
  distances = jnp.concatenate(blocks, axis=1)
  t_restore = [t_order.index(n) for n in range(len(teacher_features))]
  return distances[:, jnp.array(t_restore)] if t_restore != list(range(len(t_restore))) else distances


class AFD(nn.Module):
  """The AFD loss. Infers T, S and every shape from its inputs.

  `apply(variables, student_features, teacher_features, train, mutable=['batch_stats'])`
  returns `((loss, attention), updates)`: `loss` is L_AFD before the beta weight and
  `attention` is `B x T x S`. Teacher features are constants. The T per-teacher-layer terms
  are sown as `intermediates/per_teacher_layer`.
  """
  qk_dim: int = 128

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool):
    check_feature_pair(student_features, teacher_features)
    teacher_features = [jax.lax.stop_gradient(f) for f in teacher_features]
    t, s, d = len(teacher_features), len(student_features), self.qk_dim

    query = jnp.stack([LinearBN(d, relu=False, name=f'query_{n}')(spatial_mean(f), train)
                       for n, f in enumerate(teacher_features)], 1)           # B x T x d
    key = jnp.stack([LinearBN(d, relu=True, name=f'key_{m}')(spatial_mean(f), train)
                     for m, f in enumerate(student_features)], 1)             # B x S x d
    bilinear = BilinearLogits(name='bilinear')(key, query, train)              # B x T x S
    p_t = self.param('p_t', xavier_normal, (t, d), jnp.float32)
    p_s = self.param('p_s', xavier_normal, (s, d), jnp.float32)
    logits = (bilinear + p_t @ p_s.T) / math.sqrt(d)
    attention = jax.nn.softmax(logits, axis=-1)                               # B x T x S

    distances = pair_distances(student_features, teacher_features)           # B x T x S
    per_teacher_layer = jnp.mean(jnp.sum(attention * distances, axis=-1), axis=0)
    self.sow('intermediates', 'per_teacher_layer', per_teacher_layer)
    return jnp.sum(per_teacher_layer), attention


registry.register(registry.Method(
    'afd', build=lambda config, setting: AFD(qk_dim=config.afd.qk_dim),
    feature_weight=200.0, logit_weights=(1.0, 0.9),
    taps='every tap of both models: all (teacher, student) pairs, weighed by the attention',
    source='the official AFD recipe (KD 0.9 at T 4, beta 200)', attention=True,
    # ImageNet: the independent port's recipe (docs/method.md): beta 50, no KD.
    recipes={'imagenet': {('*', '*'): {'loss.feature_weight': 50.0, 'loss.kd_weight': 0.0}}}))

"""Contrastive representation distillation (Tian, Krishnan and Isola, ICLR 2020), as the CRD
benchmark's `CRDLoss` (HobbitLong/RepDistiller @ b84f547: crd/criterion.py, crd/memory.py, and
the negatives of dataset/cifar100.py's `CIFAR100InstanceSample`, mode 'exact').

Tap: the embeddings, i.e. the classifier's input of each model (`student_embedding`,
`teacher_embedding`, `B x D`), which is the benchmark's `feat[-1]` for its ResNets and WRNs
(train_student.py: `f_s = feat_s[-1]`, `f_t = feat_t[-1]`). The feature maps are not used.

With `v_s = normalize(W_s f_s + b_s)`, `v_t = normalize(W_t f_t + b_t)` (`Embed`: a linear layer
to `feat_dim` and L2 normalisation), two memory banks `M_s`, `M_t` (`N x feat_dim`, N = training
examples) and, for example i of the batch, `K + 1` bank rows `j_0 = i` (its own index, the
positive) and K negatives `j_1..j_K` (examples of *other* classes); `Embed` is
criterion.py:79-103, `L` is `ContrastLoss`, criterion.py:51-76:

  P_s[i, n] = exp(M_t[j_n] . v_s[i] / T) / Z_s     (student anchor, teacher bank: `out_v1`)
  P_t[i, n] = exp(M_s[j_n] . v_t[i] / T) / Z_t     (teacher anchor, student bank: `out_v2`)
  L(P) = -1/B sum_i [ log(P[i,0] / (P[i,0] + K/N + eps))
                      + sum_{n>=1} log((K/N) / (P[i,n] + K/N + eps)) ],   eps = 1e-7
  loss = L(P_s) + L(P_t)                                              (before the weight 0.8)

`Z_s`, `Z_t` are set once, on the first training batch, to `N * mean(exp(...))` of that batch
(memory.py:49-57) and fixed afterwards; no gradient flows through them. After the scores, each
bank's rows of the batch move towards the new embeddings (no gradient), momentum m:
  M_s[i] <- normalize(m M_s[i] + (1 - m) v_s[i]),  M_t[i] likewise with v_t (memory.py:63-77).
Banks start uniform on [-s, s), s = 1 / sqrt(feat_dim / 3) (memory.py:19-21), not normalised.
Banks, `Z_*` and the label table below live in 'batch_stats': updated in training mode only,
in the global batch under `jit`, checkpointed with the state (an exact resume restores them).

Defaults: feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5 (train_student.py:81-85; options
`config.crd.{feat_dim,nce_k,nce_t,nce_m}`), weight 0.8 (scripts/run_cifar_distill.sh:29,
`-a 0 -b 0.8`; CRD+KD: line 32, `-a 1 -b 0.8`). The student gets gradients through `v_s`; both
embedding heads are trained (the teacher embedding is a constant).

Differences from the original (the computation for given negatives is the same, number for
number: tests/test_crd.py against the original's `CRDLoss`, two steps, golden vectors
tests/reference/method_crd.npz from tests/reference/method_vectors/crd.py):
- The negatives are drawn in the step, from the step's `rng` input (a pure function of the
  state's RNG and the step: deterministic, and exact on resume), not by the data loader's NumPy.
  The distribution is the original's: for an example of class c, a uniform draw of nce_k
  examples of the other classes, without replacement where there are at least nce_k of them,
  else with replacement (`np.random.choice(cls_negative[c], k, replace=k > len(...))`).
- The label table (N int32 in 'batch_stats') starts as the split's labels, which the trainer
  reads before training (`needs_train_labels`): the draw is then exactly the original's from
  the first step. Where they are unknown (the benchmark's synthetic data), it starts at -1 (not
  seen yet) and learns each example's label from the batches; an example not seen yet then
  counts as a negative of every class, so in the first epoch a draw may hold same-class
  examples not seen yet, falling to none as the epoch proceeds.
- Our pipeline drops each epoch's last partial batch (the original's DataLoader keeps it), so
  those examples' bank rows move in the epochs in which they are drawn into full batches.
- Only mode 'exact' with every negative (`percent` 1) is implemented: the benchmark's setting
  (the original's 'relax' mode and `percent` < 1 are unused options).
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from afd_jax.distill import registry
from afd_jax.layers import at_least_f32, linear_bias_init, linear_kernel_init

EPS = 1e-7  # crd/criterion.py's eps
HIGHEST = jax.lax.Precision.HIGHEST  # exp(s / 0.07) magnifies TF32's rounding of s; keep f32


def normalize(x: jax.Array) -> jax.Array:
  """`x / ||x||_2` along the last axis, as CRD's `Normalize(2)` (no epsilon)."""
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class Embed(nn.Module):
  """CRD's `Embed`: flatten, a linear layer with PyTorch's default init, L2 normalisation."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.features, kernel_init=linear_kernel_init,
                 bias_init=linear_bias_init(x.shape[-1]), precision=HIGHEST, name='linear')(x)
    return normalize(x)


def contrast_loss(x: jax.Array, num_examples: int) -> jax.Array:
  """CRD's `ContrastLoss` (Eq. 18) of `B x (K + 1)` scores whose column 0 is the positive."""
  m = x.shape[1] - 1
  noise = m / float(num_examples)
  log_d1 = jnp.log(x[:, 0] / (x[:, 0] + (noise + EPS)))
  log_d0 = jnp.log(noise / (x[:, 1:] + (noise + EPS)))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / x.shape[0]


def sample_negatives(rng: jax.Array, table: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """`B x k` indices into the split: for row b, examples whose label in `table` (`N`, -1 where
  unknown) is not `labels[b]`, drawn uniformly without replacement where there are at least k
  of them, else with replacement (the original's `np.random.choice(..., replace=k > n)`)."""
  n = table.shape[0]
  batch = labels.shape[0]
  valid = table[None, :] != labels[:, None]  # B x N: the row's candidate negatives
  n_valid = jnp.sum(valid, axis=1, dtype=jnp.int32)
  perm_rng, draw_rng = jax.random.split(rng)
  # With replacement: the u-th candidate of the row, u uniform in [0, n_valid).
  u = jax.random.randint(draw_rng, (batch, k), 0, jnp.maximum(n_valid, 1)[:, None])
  rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32)  # candidates up to and including column n
  drawn = jax.vmap(lambda r, q: jnp.searchsorted(r, q, side='right'))(rank, u)
  drawn = jnp.minimum(drawn, n - 1).astype(jnp.int32)
  if k >= n:  # never k distinct negatives (the positive's own class is excluded)
    return drawn
  # Without replacement: the first k candidates of a uniform random order of the row (random
  # 31-bit keys; every non-candidate sorts after every candidate).
  keys = jax.random.bits(perm_rng, (batch, n), jnp.uint32) >> 1
  keys = jnp.where(valid, keys, jnp.uint32(0xFFFFFFFF))
  order = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  _, order = jax.lax.sort_key_val(keys, order, dimension=1)
  return jnp.where((n_valid < k)[:, None], drawn, order[:, :k])


class SplitLabels:
  """The training split's labels (int32 [N]) as a module attribute: hashed and compared by
  identity, shown by their count."""

  def __init__(self, values):
    self.values = np.asarray(values, np.int32)

  def __repr__(self):
    return f'SplitLabels({len(self.values)} labels)'


class CRD(nn.Module):
  """The CRD loss with its memory banks (module docstring).

  `apply(variables, student_features, teacher_features, train, student_embedding=...,
  teacher_embedding=..., index=..., labels=..., rng=..., mutable=['batch_stats'])` returns
  `((loss, None), updates)`; `loss` before the feature weight. `contrast_index` (`B x
  (nce_k + 1)`, column 0 = `index`) replaces the drawn negatives (the parity tests). In
  inference mode (`train=False`) nothing is updated; an unset Z then takes this batch's value.

  Attributes:
    num_examples: N, the training split's size (rows of each bank).
    feat_dim, nce_k, nce_t, nce_m: embedding size, negatives, temperature, bank momentum.
    split_labels: the split's labels by index, the label table's start (else -1: unknown).
  """
  num_examples: int
  feat_dim: int = 128
  nce_k: int = 16384
  nce_t: float = 0.07
  nce_m: float = 0.5
  split_labels: Optional[SplitLabels] = None

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool, *,
               student_embedding: jax.Array, teacher_embedding: jax.Array, index: jax.Array,
               labels: Optional[jax.Array] = None, rng: Optional[jax.Array] = None,
               contrast_index: Optional[jax.Array] = None):
    del student_features, teacher_features  # CRD uses the embeddings only
    n, dim, k = self.num_examples, self.feat_dim, self.nce_k
    batch = student_embedding.shape[0]
    v_s = Embed(dim, name='embed_s')(at_least_f32(student_embedding))
    v_t = Embed(dim, name='embed_t')(jax.lax.stop_gradient(at_least_f32(teacher_embedding)))
    dtype = v_s.dtype
    stdv = 1.0 / math.sqrt(dim / 3)

    def bank():
      return jax.random.uniform(self.make_rng('params'), (n, dim), dtype, -stdv, stdv)

    memory_s = self.variable('batch_stats', 'memory_student', bank)  # memory_v1
    memory_t = self.variable('batch_stats', 'memory_teacher', bank)  # memory_v2
    z_s = self.variable('batch_stats', 'z_student', lambda: -jnp.ones((), dtype))  # Z_v1
    z_t = self.variable('batch_stats', 'z_teacher', lambda: -jnp.ones((), dtype))  # Z_v2
    table = self.variable('batch_stats', 'labels', lambda: (
        -jnp.ones((n,), jnp.int32) if self.split_labels is None
        else jnp.asarray(self.split_labels.values)))
    update = train and not self.is_initializing()
    index = index.astype(jnp.int32)

    if contrast_index is None:
      if labels is None or rng is None:
        raise ValueError('CRD draws its negatives from `labels` and `rng`; pass both (or '
                         'contrast_index).')
      known = table.value.at[index].set(labels.astype(jnp.int32))
      if update:
        table.value = known
      negatives = sample_negatives(rng, known, labels.astype(jnp.int32), k)
      contrast_index = jnp.concatenate([index[:, None], negatives], axis=1)
    elif contrast_index.shape != (batch, k + 1):
      raise ValueError(f'contrast_index must be B x (nce_k + 1) = {(batch, k + 1)}, '
                       f'got {contrast_index.shape}.')
    elif update and labels is not None:
      table.value = table.value.at[index].set(labels.astype(jnp.int32))

    rows_s = jnp.take(memory_s.value, contrast_index, axis=0)  # B x (K+1) x D, constants
    rows_t = jnp.take(memory_t.value, contrast_index, axis=0)
    out_t = jnp.exp(jnp.einsum('bkd,bd->bk', rows_s, v_t, precision=HIGHEST) / self.nce_t)
    out_s = jnp.exp(jnp.einsum('bkd,bd->bk', rows_t, v_s, precision=HIGHEST) / self.nce_t)
    # Z is fixed from the first training batch (no gradient through it).
    z_s_value = jnp.where(z_s.value < 0, jax.lax.stop_gradient(jnp.mean(out_s)) * n, z_s.value)
    z_t_value = jnp.where(z_t.value < 0, jax.lax.stop_gradient(jnp.mean(out_t)) * n, z_t.value)
    loss = (contrast_loss(out_s / z_s_value, n) + contrast_loss(out_t / z_t_value, n))

    if update:
      z_s.value, z_t.value = z_s_value, z_t_value
      for memory, v in ((memory_s, v_s), (memory_t, v_t)):
        moved = (jnp.take(memory.value, index, axis=0) * self.nce_m
                 + jax.lax.stop_gradient(v) * (1 - self.nce_m))
        memory.value = memory.value.at[index].set(normalize(moved))
    return loss, None


def _build(config, setting: registry.Setting) -> CRD:
  n = int(setting.num_train_examples)
  if n <= 0:
    raise ValueError("method 'crd' keeps a memory bank row per training example and needs the "
                     'training split size (num_train_examples), which is unknown (0) here.')
  labels = None
  if setting.train_labels is not None:
    labels = SplitLabels(setting.train_labels)
    if labels.values.shape != (n,):
      raise ValueError(f"method 'crd': {labels.values.shape} training labels for a split of {n} "
                       'examples.')
  option = lambda key: registry.option(config, 'crd', key)
  return CRD(num_examples=n, feat_dim=int(option('feat_dim')), nce_k=int(option('nce_k')),
             nce_t=float(option('nce_t')), nce_m=float(option('nce_m')), split_labels=labels)


# Weight 0.8 and the defaults: RepDistiller scripts/run_cifar_distill.sh:29 (`--distill crd
# -a 0 -b 0.8`; CRD+KD, line 32: `-a 1 -b 0.8`, configs/methods.py:crd+kd) and
# train_student.py:81-85 (feat_dim 128, mode exact, nce_k 16384, nce_t 0.07, nce_m 0.5).
registry.register(registry.Method(
    'crd', build=_build, feature_weight=0.8,
    taps='the embeddings (classifier inputs) of both models, as the benchmark\'s feat[-1]',
    source='CRD benchmark, scripts/run_cifar_distill.sh:29: --distill crd -a 0 -b 0.8 '
           '(CRD+KD, line 32: -a 1 -b 0.8); train_student.py:81-85',
    inputs=('student_embedding', 'teacher_embedding', 'index', 'labels', 'rng'),
    needs_train_labels=True,
    options={'feat_dim': 128, 'nce_k': 16384, 'nce_t': 0.07, 'nce_m': 0.5}))

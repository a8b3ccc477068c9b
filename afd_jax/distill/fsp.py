"""Flow of solution procedure (Yim et al., CVPR 2017), as the CRD benchmark runs it
(`--distill fsp`). Matches HobbitLong/RepDistiller `distiller_zoo/FSP.py` and the `fsp` branches of
`helper/pretrain.py` and `train_student.py`.

For consecutive maps `a` (C_a channels) and `b` (C_b) of one model, the larger map is
adaptive-average-pooled to the smaller size and the FSP matrix is
`G[n, j, i] = mean_{h,w} b[n, h, w, j] * a[n, h, w, i]` (`B x C_b x C_a`). The loss is the sum
over consecutive pairs of `mean((G_s - G_t)^2)` over batch and both channel axes. Student and
teacher must have equal channels at every map (CRD raises otherwise; so does this module).
No parameters, no state.

Stages. FSP is a two-stage method: the benchmark trains the student's body (`get_feat_modules()`:
everything but the classifier) on this loss alone for `init_epochs = 30` epochs (`Pretrain`, SGD
lr 0.05, momentum 0.9, weight decay 5e-4), then trains with cross-entropy only: its main-stage
loop sets `loss_kd = 0` for `fsp` (helper/loops.py:174-176), so the script's `-b 50`
(scripts/run_cifar_distill.sh:25) multiplies zero. Hence the registered feature weight 0;
`__call__` still returns the FSP loss, so a positive `feature_weight` adds it to the main stage.

Taps. The benchmark uses `feat[:-1]`: for its ResNets and WRNs the stem's output `f0` and the
three stage outputs, i.e. three matrices (f0, f1), (f1, f2), (f2, f3); for VGG the five blocks'
outputs (four matrices). afd_jax's taps do not include the stem, so the default here is the last
tap of each stage both models have (`stage_pairs`), consecutive stages paired: for ResNets and
WRNs the matrices (f1, f2) and (f2, f3) - the benchmark's last two, the same maps for its
ResNets - without (f0, f1); for VGG all four, the same maps. (The benchmark's WRN `f1..f3` are the
raw block outputs; afd_jax's WRN taps are ReLU(BN(.)) of them.)
The student body of the stage is every parameter but the classifier (`models.classifier`).
For the WRNs the benchmark's `get_feat_modules()` also leaves out the final batch norm
(`bn1`), which its `init()` neither trains nor switches to training mode; here it trains and
its running statistics move during the stage (the WRN taps pass through it).
"""
from typing import List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.at import check_index, pool_nhwc, stage_pairs
from afd_jax.layers import at_least_f32, check_feature_pair


def fsp_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
  """`B x H x W x C_a`, `B x H' x W' x C_b` -> `B x C_b x C_a`, the larger map pooled first."""
  hw = (min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2]))
  a, b = pool_nhwc(a, hw), pool_nhwc(b, hw)
  return jnp.einsum('nhwi,nhwj->nji', a, b,
                    precision=jax.lax.Precision.HIGHEST) / (hw[0] * hw[1])


class FSP(nn.Module):
  """The FSP loss: `(loss, per_pair)` before the feature weight; `pretrain_loss` is the same.

  Attributes:
    student_taps, teacher_taps: indices into the feature lists, shallow to deep, of equal
      length >= 2; matrices are formed between consecutive entries.
  """
  student_taps: Tuple[int, ...]
  teacher_taps: Tuple[int, ...]

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool):
    del train  # No parameters or statistics.
    check_feature_pair(student_features, teacher_features)
    if len(self.student_taps) != len(self.teacher_taps) or len(self.student_taps) < 2:
      raise ValueError(f'FSP needs equally many (>= 2) student and teacher taps, got '
                       f'{len(self.student_taps)} and {len(self.teacher_taps)}.')
    f_s, f_t = [], []
    for s_idx, t_idx in zip(self.student_taps, self.teacher_taps):
      check_index(s_idx, student_features, 'student index')
      check_index(t_idx, teacher_features, 'teacher index')
      s, t = student_features[s_idx], teacher_features[t_idx]
      if s.shape[-1] != t.shape[-1]:
        raise ValueError(f'FSP needs equal channels in student and teacher maps: student tap '
                         f'{s_idx} has {s.shape[-1]}, teacher tap {t_idx} has {t.shape[-1]}.')
      f_s.append(at_least_f32(s))
      f_t.append(jax.lax.stop_gradient(at_least_f32(t)))
    losses: List[jax.Array] = []
    for i in range(len(f_s) - 1):
      g_s, g_t = fsp_matrix(f_s[i], f_s[i + 1]), fsp_matrix(f_t[i], f_t[i + 1])
      losses.append(jnp.mean(jnp.square(g_s - g_t)))
    per_pair = jnp.stack(losses)
    return jnp.sum(per_pair), per_pair

  def pretrain_loss(self, student_features, teacher_features, train: bool):
    return self(student_features, teacher_features, train)


def _build(config, setting: registry.Setting) -> FSP:
  del config
  pairs = stage_pairs(setting.student_taps, setting.teacher_taps)
  return FSP(student_taps=tuple(s for s, _ in pairs), teacher_taps=tuple(t for _, t in pairs))


registry.register(registry.Method(
    'fsp', build=_build,
    # scripts/run_cifar_distill.sh:25 `--distill fsp -a 0 -b 50`, but helper/loops.py:174-176
    # sets the main stage's FSP term to 0: only CE trains after the pre-training stage.
    feature_weight=0.0,
    taps='the last tap of each stage, consecutive stages paired (the benchmark also pairs the '
         'stem with the first stage)',
    source='CRD benchmark, scripts/run_cifar_distill.sh:25 --distill fsp -a 0 -b 50; '
           'helper/loops.py:174-176 (main-stage FSP term 0); helper/pretrain.py init() '
           '(30 epochs, lr 0.05, student body)',
    # helper/pretrain.py: SGD(lr=opt.learning_rate 0.05, momentum 0.9, weight_decay 5e-4) over
    # model_s.get_feat_modules() for opt.init_epochs = 30 (train_student.py:47, 254-261).
    pretrain=registry.Pretrain(trains=('student_body',), method='pretrain_loss', epochs=30,
                               learning_rate=0.05, momentum=0.9, weight_decay=5e-4)))

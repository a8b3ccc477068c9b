"""Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021) on the per-pixel logits of a segmentation student and teacher.

Each class channel's logit map becomes a distribution over the image's positions (softmax of
`map / T`); the loss is `T^2 * KL(teacher || student)`, summed over positions, averaged over
the batch and the channels (`dense.cwd_loss`, equal to the authors' `CriterionCWD('channel',
'kl', T)`: tests/test_dense.py). Defaults are the authors' Cityscapes recipe: T = 4, weight 3.
Segmentation only: a classifier's logits have no positions.

Departure: the authors apply it to their head's logits at 1/8 of the input's resolution, where
T and the weight were tuned; here it takes the logits the student returns, at the input's
resolution (for the CIFAR backbones the FPN's finest level is the input's anyway).
"""
import flax.linen as nn

from afd_jax.distill import registry
from afd_jax.distill.dense import cwd_loss

TEMPERATURE = 4.0
WEIGHT = 3.0


class CWD(nn.Module):
  """`(student_features, teacher_features, train, student_logits=, teacher_logits=)` ->
  `(loss, None)`; no parameters. The logits are `B x H x W x K`; the maps are not used."""
  temperature: float = TEMPERATURE

  def __call__(self, student_features, teacher_features, train: bool, *, student_logits,
               teacher_logits):
    del student_features, teacher_features, train
    return cwd_loss(student_logits, teacher_logits, self.temperature), None


def _build(config, setting: registry.Setting) -> CWD:
  del setting
  temperature = float(registry.option(config, 'cwd', 'temperature'))
  if temperature <= 0:
    raise ValueError(f'cwd.temperature must be positive, got {temperature}.')
  return CWD(temperature=temperature)


registry.register(registry.Method(
    'cwd', build=_build, feature_weight=WEIGHT, logit_weights=(1.0, 0.0),
    taps='none: the per-pixel logits only (each class channel over the positions)',
    inputs=('student_logits', 'teacher_logits'), tasks=('segmentation',),
    source='irfanICMLL/TorchDistiller SemSeg-distill: exp_cwd.sh and README (norm channel, '
           'divergence kl, weight 3, T 4), utils/criterion.py CriterionCWD',
    options={'temperature': TEMPERATURE}))

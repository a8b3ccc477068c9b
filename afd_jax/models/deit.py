"""Data-efficient image Transformers with a distillation token (Touvron et al. 2021, DeiT's
`DistilledVisionTransformer`): `deit_ti16`, `deit_s16`, `deit_b16` (the sizes of `vit_ti16`,
`vit_s16`, `vit_b16`), `deit_mini4` and `deit_micro4` (those of `vit_mini4` and `vit_micro4`:
patch 4, for 32x32 and 28x28 images).

A zoo ViT (afd_jax/models/vit.py) with two prefix tokens, the class token then `dist_token`
(position embeddings for both, `2 + patches` rows as DeiT's `pos_embed`), and a second head,
`head_dist`, on the distillation token. In training the model returns the class head's logits;
in evaluation the mean of the two heads' *logits* (not of their softmax outputs), as DeiT's
`forward` and transformers' `DeiTForImageClassificationWithTeacher` do. The distillation head's
logits reach a distillation loss through `models.apply_with_dist_logits`. Taps: every block's
patch tokens (both prefix tokens dropped), as the ViTs'.
"""
import flax.linen as nn
import jax

from afd_jax.layers import at_least_f32
from afd_jax.models import vit


class DeiT(vit.ViT):
  """Returns `(logits, taps)`; see the module docstring."""
  num_prefix_tokens = 2  # class and distillation tokens (not fields)
  prefix_token_names = ('cls_token', 'dist_token')
  distillation_head = 'head_dist'  # the submodule whose output a distillation loss reads

  def classify(self, tokens: jax.Array, train: bool) -> jax.Array:
    # head_dist first: the classifier (classifier.py) is the last Dense returning the logits.
    head = nn.Dense(self.num_classes, dtype=self.dtype, name=self.distillation_head,
                    kernel_init=nn.initializers.truncated_normal(0.02))
    dist = at_least_f32(head(tokens[:, 1]))
    logits = super().classify(tokens, train)
    return logits if train else (logits + dist) / 2


# DeiT's sizes (Ti, S, B; DeiT has no L or H) and the zoo's small-image ones.
CONFIGS = {'deit_' + name[len('vit_'):]: options for name, options in vit.CONFIGS.items()
           if name not in ('vit_l16', 'vit_h14')}

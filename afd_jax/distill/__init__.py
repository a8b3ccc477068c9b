"""Distillation losses. Feature distillers take lists of feature maps and know nothing of models.

Every feature distiller is called as `(student_features, teacher_features, train)` and returns
`(loss, aux)`.
"""
from afd_jax.distill.afd import AFD
from afd_jax.distill.kd import cross_entropy, kd_loss

__all__ = ['AFD', 'cross_entropy', 'kd_loss']

"""Golden vectors of `deit_hard` and `deit_soft`: facebookresearch/deit's `DistillationLoss`
(losses.py), loaded by path and run as DeiT's main.py builds it (base criterion
`torch.nn.CrossEntropyLoss()`, alpha 0.5), around a stand-in teacher that returns fixed logits.

Three cases, batch 8, 10 classes, stored whole: `hard/`, `soft_t1/` (tau 1, DeiT's default) and
`soft_t3/` (tau 3). Per case the inputs `outputs` (the class-token head's logits),
`outputs_kd` (the distillation head's), `teacher_logits`, `labels`, `alpha`, `tau`; the
original's `base_loss` (its type 'none'), `distill_loss` (alpha 1), `loss` (alpha 0.5), and
`grad_outputs`, `grad_outputs_kd` (d loss / d each head's logits) and `grad_distill_outputs_kd`
(d distill_loss / d the distillation head's logits).
"""
import numpy as np

from method_vectors import load

REPO = 'deit'
SEED = 2021
BATCH, CLASSES, ALPHA = 8, 10, 0.5
CASES = {'hard': ('hard', 1.0), 'soft_t1': ('soft', 1.0), 'soft_t3': ('soft', 3.0)}


def make(repo_dir):
  import torch  # pylint: disable=g-import-not-at-top
  from make_vectors import f32  # pylint: disable=g-import-not-at-top
  losses = load(repo_dir, 'losses.py')

  class Fixed(torch.nn.Module):
    """A stand-in teacher: the same stored logits for any input."""

    def __init__(self, logits):
      super().__init__()
      self.logits = logits

    def forward(self, inputs):
      del inputs
      return self.logits

  rng = np.random.default_rng(SEED)
  images = torch.zeros(BATCH, 3, 2, 2)
  out = {}
  for case, (kind, tau) in CASES.items():
    cls_np = (2.0 * rng.standard_normal((BATCH, CLASSES))).astype(np.float32)
    dist_np = (2.0 * rng.standard_normal((BATCH, CLASSES))).astype(np.float32)
    teacher_np = (3.0 * rng.standard_normal((BATCH, CLASSES))).astype(np.float32)
    labels_np = rng.integers(0, CLASSES, BATCH).astype(np.int64)
    teacher, labels = Fixed(torch.from_numpy(teacher_np)), torch.from_numpy(labels_np)

    def run(distillation_type, alpha):
      heads = (torch.from_numpy(cls_np).requires_grad_(),
               torch.from_numpy(dist_np).requires_grad_())
      criterion = losses.DistillationLoss(torch.nn.CrossEntropyLoss(), teacher,
                                          distillation_type, alpha, tau)
      loss = criterion(images, heads, labels)
      loss.backward()
      return loss, heads

    base, _ = run('none', ALPHA)
    distill, (_, distill_kd) = run(kind, 1.0)
    loss, (grad_cls, grad_kd) = run(kind, ALPHA)
    out.update({
        f'{case}/outputs': cls_np, f'{case}/outputs_kd': dist_np,
        f'{case}/teacher_logits': teacher_np, f'{case}/labels': labels_np.astype(np.int32),
        f'{case}/alpha': np.float64(ALPHA), f'{case}/tau': np.float64(tau),
        f'{case}/base_loss': f32(base), f'{case}/distill_loss': f32(distill),
        f'{case}/loss': f32(loss), f'{case}/grad_outputs': f32(grad_cls.grad),
        f'{case}/grad_outputs_kd': f32(grad_kd.grad),
        f'{case}/grad_distill_outputs_kd': f32(distill_kd.grad)})
  return out

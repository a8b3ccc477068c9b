"""Golden vectors of DKD: mdistiller's `DKD.forward_train` (mdistiller/distillers/DKD.py).

The distiller is built with stand-in student and teacher modules that return fixed logits, so
its own code computes `loss_ce` and `loss_kd` (warm-up included). Two cases, each stored
whole (the inputs are tiny): `c{k}/student_logits`, `c{k}/teacher_logits` (B x K),
`c{k}/labels`, `c{k}/epoch`, `c{k}/alpha`, `c{k}/beta`, `c{k}/temperature`, `c{k}/warmup`;
outputs `c{k}/loss_kd`, `c{k}/loss_ce`, `c{k}/tckd`, `c{k}/nckd` (`dkd_loss` with (alpha, beta)
= (1, 0) and (0, 1)), `c{k}/grad_student_logits` (d loss_kd / d student logits).
"""
import sys
import types

import numpy as np
import torch

REPO = 'mdistiller'
BATCH, CLASSES = 8, 10
# (epoch, alpha, beta): in the warm-up with cfg.py's defaults, and after it with a pair's beta.
CASES = ((5, 1.0, 8.0), (40, 1.0, 6.0))


class _Fixed(torch.nn.Module):
  """A stand-in network that returns fixed logits (and no features)."""

  def __init__(self, logits):
    super().__init__()
    self.logits = logits

  def forward(self, image):
    del image
    return self.logits, None


def make(repo_dir: str) -> dict:
  sys.path.insert(0, repo_dir)
  try:
    from mdistiller.distillers.DKD import DKD, dkd_loss  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(repo_dir)
  torch.manual_seed(0)
  rng = np.random.default_rng(2022)
  out = {}
  for k, (epoch, alpha, beta) in enumerate(CASES):
    s = (3.0 * rng.standard_normal((BATCH, CLASSES))).astype(np.float32)
    t = (3.0 * rng.standard_normal((BATCH, CLASSES))).astype(np.float32)
    labels = rng.integers(0, CLASSES, BATCH).astype(np.int64)
    cfg = types.SimpleNamespace(DKD=types.SimpleNamespace(
        CE_WEIGHT=1.0, ALPHA=alpha, BETA=beta, T=4.0, WARMUP=20))
    s_t = torch.tensor(s, requires_grad=True)
    distiller = DKD(_Fixed(s_t), _Fixed(torch.tensor(t)), cfg)
    distiller.train()
    _, losses = distiller(image=torch.zeros(BATCH, 3, 2, 2), target=torch.tensor(labels),
                          epoch=epoch)
    (grad,) = torch.autograd.grad(losses['loss_kd'], s_t)
    target = torch.tensor(labels)
    with torch.no_grad():
      tckd = dkd_loss(s_t, torch.tensor(t), target, 1.0, 0.0, 4.0)
      nckd = dkd_loss(s_t, torch.tensor(t), target, 0.0, 1.0, 4.0)
    out.update({
        f'c{k}/student_logits': s, f'c{k}/teacher_logits': t,
        f'c{k}/labels': labels.astype(np.int32), f'c{k}/epoch': np.int32(epoch),
        f'c{k}/alpha': np.float32(alpha), f'c{k}/beta': np.float32(beta),
        f'c{k}/temperature': np.float32(4.0), f'c{k}/warmup': np.float32(20),
        f'c{k}/loss_kd': np.float32(losses['loss_kd'].item()),
        f'c{k}/loss_ce': np.float32(losses['loss_ce'].item()),
        f'c{k}/tckd': np.float32(tckd.item()), f'c{k}/nckd': np.float32(nckd.item()),
        f'c{k}/grad_student_logits': grad.numpy().astype(np.float32),
    })
  return out

"""Golden vectors of RKD: RepDistiller `distiller_zoo/RKD.py` (w_d 25, w_a 50) on two small
embeddings.

Arrays: `student_embedding` (B x D_s), `teacher_embedding` (B x D_t), `loss` (25 L_d + 50 L_a),
`loss_distance` (L_d: the module with w_d 1, w_a 0), `loss_angle` (L_a: w_d 0, w_a 1),
`grad_student_embedding` (d loss / d student embedding).
"""
import numpy as np
import torch

from make_vectors import f32
from method_vectors import load

REPO = 'repdistiller'


def make(repo_dir: str) -> dict:
  torch.manual_seed(0)
  rng = np.random.default_rng(102)
  s = np.maximum(rng.standard_normal((6, 5)) + 0.3, 0).astype(np.float32)
  t = np.maximum(rng.standard_normal((6, 7)) + 0.3, 0).astype(np.float32)
  module = load(repo_dir, 'distiller_zoo/RKD.py')
  out = {'student_embedding': s, 'teacher_embedding': t}
  for key, (w_d, w_a) in (('loss_distance', (1, 0)), ('loss_angle', (0, 1))):
    out[key] = f32(module.RKDLoss(w_d=w_d, w_a=w_a)(torch.tensor(s), torch.tensor(t)))
  rkd = module.RKDLoss()  # the benchmark's: train_student.py:206, w_d=25, w_a=50
  rkd.train()
  f_s = torch.tensor(s, requires_grad=True)
  loss = rkd(f_s, torch.tensor(t))
  loss.backward()
  out.update(loss=f32(loss), grad_student_embedding=f32(f_s.grad))
  return out

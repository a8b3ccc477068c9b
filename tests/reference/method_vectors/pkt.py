"""Golden vectors of PKT: RepDistiller `distiller_zoo/PKT.py` on two small embeddings.

Arrays: `student_embedding` (B x D_s), `teacher_embedding` (B x D_t), `loss`,
`grad_student_embedding` (d loss / d student embedding).
"""
import numpy as np
import torch

from make_vectors import f32
from method_vectors import load

REPO = 'repdistiller'


def make(repo_dir: str) -> dict:
  torch.manual_seed(0)
  rng = np.random.default_rng(101)
  # Post-ReLU-like pooled embeddings: non-negative, a few exact zeros.
  s = np.maximum(rng.standard_normal((6, 5)) + 0.3, 0).astype(np.float32)
  t = np.maximum(rng.standard_normal((6, 7)) + 0.3, 0).astype(np.float32)
  pkt = load(repo_dir, 'distiller_zoo/PKT.py').PKT()
  pkt.train()
  f_s = torch.tensor(s, requires_grad=True)
  loss = pkt(f_s, torch.tensor(t))
  loss.backward()
  return {'student_embedding': s, 'teacher_embedding': t, 'loss': f32(loss),
          'grad_student_embedding': f32(f_s.grad)}

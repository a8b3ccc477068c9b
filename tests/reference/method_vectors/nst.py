"""Golden vectors of NST: RepDistiller `distiller_zoo/NST.py` (`NSTLoss`) on three pairs of
stage maps, summed as helper/loops.py:139-143 does.

Pairs (student H, teacher H): (8, 4) the student pooled, (4, 6) the teacher pooled to a size
that does not divide, (3, 3) no pooling; channel counts differ in every pair; one student
channel and one teacher channel are all zero (F.normalize's clamp).
Arrays: `student/{k}`, `teacher/{k}` (channels-last maps), `loss` (the sum), `per_pair`,
`grad_student/{k}` (d loss / d student map k, channels-last).
"""
import numpy as np
import torch

from make_vectors import f32
from method_vectors import load

REPO = 'repdistiller'
BATCH = 3
STUDENT = [(8, 4), (4, 6), (3, 8)]  # (H = W, channels)
TEACHER = [(4, 5), (6, 3), (3, 6)]


def maps(rng, specs):
  return [np.maximum(rng.standard_normal((BATCH, h, h, c)), 0).astype(np.float32)
          for h, c in specs]


def pair_arrays(loss, per_pair, student, teacher, g_s) -> dict:
  """The arrays of a method over pairs of maps: loss, per_pair, the maps (channels-last) and
  d loss / d each student map (channels-last)."""
  out = {'loss': f32(loss), 'per_pair': f32(torch.stack(per_pair))}
  for k in range(len(student)):
    out[f'student/{k}'] = student[k]
    out[f'teacher/{k}'] = teacher[k]
    out[f'grad_student/{k}'] = f32(g_s[k].grad).transpose(0, 2, 3, 1)
  return out


def make(repo_dir: str) -> dict:
  torch.manual_seed(0)
  rng = np.random.default_rng(104)
  student, teacher = maps(rng, STUDENT), maps(rng, TEACHER)
  student[2][..., 1] = 0.0  # a dead channel
  teacher[1][..., 0] = 0.0
  nst = load(repo_dir, 'distiller_zoo/NST.py').NSTLoss()
  nst.train()
  g_s = [torch.tensor(f.transpose(0, 3, 1, 2).copy(), requires_grad=True) for f in student]
  g_t = [torch.tensor(f.transpose(0, 3, 1, 2).copy()) for f in teacher]
  per_pair = nst(g_s, g_t)
  loss = sum(per_pair)
  loss.backward()
  return pair_arrays(loss, per_pair, student, teacher, g_s)

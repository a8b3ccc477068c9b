"""Golden vectors of VID: RepDistiller `distiller_zoo/VID.py`, one `VIDLoss(s, t, t)` per pair of
stage maps (train_student.py:219-226), the losses summed (helper/loops.py:166-170).

Pairs (student H, teacher H): (8, 4) the student pooled, (4, 6) the teacher pooled to a size
that does not divide, (3, 3) no pooling; channel counts differ in every pair.
Arrays: `student/{k}`, `teacher/{k}` (channels-last maps); `sd/<name>` every parameter
(PyTorch names of the ModuleList: `{k}.regressor.{0,2,4}.weight` (out x in x 1 x 1),
`{k}.log_scale`), redrawn: conv weights N / sqrt(fan_in), log_scale the original's initial
value plus 0.5 N (so that the variances differ per channel); `loss`, `per_pair`,
`grad_student/{k}`, `grad_sd/<name>`.
"""
import numpy as np
import torch

from method_vectors.nst import maps, pair_arrays
from make_vectors import f32
from method_vectors import load

REPO = 'repdistiller'
STUDENT = [(8, 4), (4, 6), (3, 8)]  # (H = W, channels)
TEACHER = [(4, 5), (6, 3), (3, 6)]


def make(repo_dir: str) -> dict:
  torch.manual_seed(0)
  rng = np.random.default_rng(105)
  student, teacher = maps(rng, STUDENT), maps(rng, TEACHER)
  vid = load(repo_dir, 'distiller_zoo/VID.py')
  criterion = torch.nn.ModuleList([vid.VIDLoss(s, t, t) for (_, s), (_, t) in
                                   zip(STUDENT, TEACHER)])
  sd = {}
  for name, p in criterion.named_parameters():
    if name.endswith('log_scale'):
      value = p.detach().numpy() + 0.5 * rng.standard_normal(tuple(p.shape))
    else:
      value = rng.standard_normal(tuple(p.shape)) / np.sqrt(p.shape[1])
    sd[name] = value.astype(np.float32)
    with torch.no_grad():
      p.copy_(torch.tensor(sd[name]))
  criterion.train()
  g_s = [torch.tensor(f.transpose(0, 3, 1, 2).copy(), requires_grad=True) for f in student]
  g_t = [torch.tensor(f.transpose(0, 3, 1, 2).copy()) for f in teacher]
  per_pair = [c(f_s, f_t) for f_s, f_t, c in zip(g_s, g_t, criterion)]
  loss = sum(per_pair)
  loss.backward()
  out = pair_arrays(loss, per_pair, student, teacher, g_s)
  for name, p in criterion.named_parameters():
    out[f'sd/{name}'] = sd[name]
    out[f'grad_sd/{name}'] = f32(p.grad)
  return out

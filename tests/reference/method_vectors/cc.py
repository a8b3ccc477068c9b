"""Golden vectors of CC: RepDistiller `distiller_zoo/CC.py` (`Correlation`) after the benchmark's
two `models/util.py` `LinearEmbed` heads (train_student.py:211-218, helper/loops.py:162-165).

Arrays: `student_embedding` (B x D_s), `teacher_embedding` (B x D_t), `feat_dim`,
`sd/<name>` the heads' parameters (PyTorch names `embed_s.linear.weight`, ..., `out x in`),
`loss`, `grad_student_embedding`, `grad_sd/<name>` (d loss / d each head parameter).
"""
import numpy as np
import torch

from make_vectors import f32
from method_vectors import load

REPO = 'repdistiller'
FEAT_DIM = 4


def make(repo_dir: str) -> dict:
  torch.manual_seed(0)
  rng = np.random.default_rng(103)
  s = np.maximum(rng.standard_normal((6, 5)) + 0.3, 0).astype(np.float32)
  t = np.maximum(rng.standard_normal((6, 7)) + 0.3, 0).astype(np.float32)
  util = load(repo_dir, 'models/util.py')
  correlation = load(repo_dir, 'distiller_zoo/CC.py').Correlation()
  heads = torch.nn.ModuleDict({'embed_s': util.LinearEmbed(5, FEAT_DIM),
                               'embed_t': util.LinearEmbed(7, FEAT_DIM)})
  sd = {}
  for name, p in heads.named_parameters():  # redrawn, not PyTorch's init: N / sqrt(fan_in)
    fan_in = p.shape[1] if p.ndim == 2 else 1
    value = rng.standard_normal(tuple(p.shape)) / np.sqrt(fan_in)
    sd[name] = value.astype(np.float32)
    with torch.no_grad():
      p.copy_(torch.tensor(sd[name]))
  heads.train()
  f_s = torch.tensor(s, requires_grad=True)
  loss = correlation(heads['embed_s'](f_s), heads['embed_t'](torch.tensor(t)))
  loss.backward()
  out = {'student_embedding': s, 'teacher_embedding': t, 'feat_dim': np.int32(FEAT_DIM),
         'loss': f32(loss), 'grad_student_embedding': f32(f_s.grad)}
  for name, p in heads.named_parameters():
    out[f'sd/{name}'] = sd[name]
    out[f'grad_sd/{name}'] = f32(p.grad)
  return out

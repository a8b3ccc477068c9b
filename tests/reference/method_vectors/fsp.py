"""Golden vectors of `fsp` (flow of solution procedure) from RepDistiller's own code.

RepDistiller's `distiller_zoo/FSP.FSP` as its `helper/pretrain.py` init() runs it for `fsp`:
`loss = sum(FSP(feat_s, feat_t))` on consecutive maps (the benchmark's main stage has no FSP
term, helper/loops.py:174-176, so this is the only loss). Four maps per model, equal channels,
spatial sizes chosen so that both the lower and the upper map of a pair get pooled, to sizes
that divide and that do not (student 4, 4, 2, 3; teacher 6, 4, 4, 2). FSP has no parameters.
"""
import numpy as np

from method_vectors import load, pairwise_arrays

REPO = 'repdistiller'
SEED = 3300
BATCH = 3
CHANNELS = (3, 4, 5, 2)
STUDENT_HW = (4, 4, 2, 3)
TEACHER_HW = (6, 4, 4, 2)


def make(repo_dir):
  import torch  # pylint: disable=g-import-not-at-top
  fsp = load(repo_dir, 'distiller_zoo/FSP.py')
  torch.manual_seed(SEED)
  rng = np.random.default_rng(SEED)
  s_np = [rng.standard_normal((BATCH, h, h, c)).astype(np.float32)
          for c, h in zip(CHANNELS, STUDENT_HW)]
  t_np = [rng.standard_normal((BATCH, h, h, c)).astype(np.float32)
          for c, h in zip(CHANNELS, TEACHER_HW)]
  g_s = [torch.from_numpy(f.transpose(0, 3, 1, 2)).requires_grad_() for f in s_np]
  g_t = [torch.from_numpy(f.transpose(0, 3, 1, 2)) for f in t_np]
  criterion = fsp.FSP([f.shape for f in g_s], [f.shape for f in g_t])
  losses = criterion(g_s, g_t)
  return pairwise_arrays(losses, s_np, t_np, g_s)

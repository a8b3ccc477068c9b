"""Golden vectors of `at` (attention transfer) from RepDistiller's own code.

`distiller_zoo/AT.Attention()` (p = 2) summed over pairs, as `helper/loops.py` runs it for
`attention`: `loss = sum(Attention()(g_s, g_t))`. Batch 3, three pairs (student C x H, teacher
C x H): (4 x 6, 5 x 3) the student pooled, (3 x 3, 6 x 5) the teacher pooled to a size that does
not divide, (5 x 4, 2 x 4) no pooling. Maps are ReLU of noise (the benchmark's stage outputs);
example 1 of pair 0's student map is all zero (F.normalize's clamp).
"""
import numpy as np

from method_vectors import load, pairwise_arrays

REPO = 'repdistiller'
SEED = 3400
BATCH = 3
PAIRS = [((4, 6), (5, 3)), ((3, 3), (6, 5)), ((5, 4), (2, 4))]


def make(repo_dir):
  import torch  # pylint: disable=g-import-not-at-top
  at = load(repo_dir, 'distiller_zoo/AT.py')
  rng = np.random.default_rng(SEED)
  relu_noise = lambda c, h: np.maximum(rng.standard_normal((BATCH, h, h, c)), 0).astype(np.float32)
  s_np = [relu_noise(c, h) for (c, h), _ in PAIRS]
  t_np = [relu_noise(c, h) for _, (c, h) in PAIRS]
  s_np[0][1] = 0.0
  nchw = lambda f: torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2)))
  g_s = [nchw(f).requires_grad_() for f in s_np]
  g_t = [nchw(f) for f in t_np]
  losses = at.Attention()(g_s, g_t)
  return pairwise_arrays(losses, s_np, t_np, g_s)

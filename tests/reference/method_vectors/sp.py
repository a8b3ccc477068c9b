"""Golden vectors of `sp` (similarity preserving) from RepDistiller's own code.

`distiller_zoo/SP.Similarity()` on one pair, as `helper/loops.py` runs it for `similarity`:
`loss = sum(Similarity()([feat_s[-2]], [feat_t[-2]]))`, the last block's maps (post-ReLU). Batch
5, student C x H = 6 x 4, teacher 8 x 2 (any shapes but the batch). Example 2 of the student is
all zero (its Gram row is zero: F.normalize's clamp).
"""
import numpy as np

from method_vectors import load

REPO = 'repdistiller'
SEED = 3500
BATCH = 5
STUDENT, TEACHER = (6, 4), (8, 2)  # C, H


def make(repo_dir):
  import torch  # pylint: disable=g-import-not-at-top
  from make_vectors import f32, nhwc  # pylint: disable=g-import-not-at-top
  sp = load(repo_dir, 'distiller_zoo/SP.py')
  rng = np.random.default_rng(SEED)
  relu_noise = lambda c, h: np.maximum(rng.standard_normal((BATCH, h, h, c)), 0).astype(np.float32)
  s_np, t_np = relu_noise(*STUDENT), relu_noise(*TEACHER)
  s_np[2] = 0.0
  nchw = lambda f: torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2)))
  f_s, f_t = nchw(s_np).requires_grad_(), nchw(t_np)  # contiguous, as the benchmark's maps
  loss = sum(sp.Similarity()([f_s], [f_t]))  # a 1-element tensor, as in the benchmark
  loss.backward()
  return {'student': s_np, 'teacher': t_np, 'loss': f32(loss).reshape(()),
          'grad_student': nhwc(f_s.grad)}

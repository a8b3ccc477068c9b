"""Golden vectors of `kd` (Hinton's knowledge distillation) from RepDistiller's own code.

`distiller_zoo/KD.DistillKL(T)(y_s, y_t)`: `KL(softmax(y_t / T) || softmax(y_s / T)) * T^2 / B`.
Two cases of batch 6 and 10 classes: `t4/` the benchmark's `kd_T = 4`, `t1/` T = 1 (the teacher's
logits sharp enough that some probabilities are tiny).
"""
import warnings

import numpy as np

from method_vectors import load

REPO = 'repdistiller'
SEED = 3600
CASES = {'t4': (4.0, 3.0), 't1': (1.0, 8.0)}  # temperature, teacher logits' scale


def make(repo_dir):
  import torch  # pylint: disable=g-import-not-at-top
  from make_vectors import f32  # pylint: disable=g-import-not-at-top
  kd = load(repo_dir, 'distiller_zoo/KD.py')
  rng = np.random.default_rng(SEED)
  out = {}
  for case, (temperature, scale) in CASES.items():
    s_np = (2.0 * rng.standard_normal((6, 10))).astype(np.float32)
    t_np = (scale * rng.standard_normal((6, 10))).astype(np.float32)
    y_s = torch.from_numpy(s_np).requires_grad_()
    with warnings.catch_warnings():  # KD.py's `size_average=False` is deprecated (= 'sum')
      warnings.simplefilter('ignore')
      loss = kd.DistillKL(temperature)(y_s, torch.from_numpy(t_np))
    loss.backward()
    out.update({f'{case}/student_logits': s_np, f'{case}/teacher_logits': t_np,
                f'{case}/temperature': np.float64(temperature), f'{case}/loss': f32(loss),
                f'{case}/grad_student_logits': f32(y_s.grad)})
  return out

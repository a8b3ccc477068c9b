"""Golden vectors of `cwd` (channel-wise distillation) from the CWD authors' own code.

irfanICMLL/TorchDistiller, `SemSeg-distill/utils/criterion.py`, `CriterionCWD(norm_type='channel',
divergence='kl', temperature=T)(preds_S, preds_T)`: each channel softmax-normalised over its
positions at T, KL summed, divided by N * C, times T^2. Two cases of 2 x 5-class 6 x 7 logit maps:
`t4/` the authors' recipe (`exp_cwd.sh channel kl 3 4`, T = 4), `t1/` T = 1 with a sharper
teacher (some positions' probabilities tiny). Stored channels-last (`B x H x W x K`).
"""
import numpy as np

from method_vectors import load

REPO = 'torchdistiller'
SEED = 3733
CASES = {'t4': (4.0, 3.0), 't1': (1.0, 8.0)}  # temperature, teacher logits' scale


def make(repo_dir):
  import torch  # pylint: disable=g-import-not-at-top
  from make_vectors import f32, nhwc  # pylint: disable=g-import-not-at-top
  criterion = load(repo_dir, 'SemSeg-distill/utils/criterion.py')
  rng = np.random.default_rng(SEED)
  out = {}
  for case, (temperature, scale) in CASES.items():
    s_np = (2.0 * rng.standard_normal((2, 5, 6, 7))).astype(np.float32)
    t_np = (scale * rng.standard_normal((2, 5, 6, 7))).astype(np.float32)
    preds_s = torch.from_numpy(s_np).requires_grad_()
    loss = criterion.CriterionCWD('channel', 'kl', temperature)(preds_s, torch.from_numpy(t_np))
    loss.backward()
    out.update({f'{case}/student_logits': s_np.transpose(0, 2, 3, 1),
                f'{case}/teacher_logits': t_np.transpose(0, 2, 3, 1),
                f'{case}/temperature': np.float64(temperature), f'{case}/loss': f32(loss),
                f'{case}/grad_student_logits': nhwc(preds_s.grad)})
  return out

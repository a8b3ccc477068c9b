"""Golden vectors of `fitnet` (hints) from RepDistiller's own code.

One train-mode step of `models/util.ConvReg(s_shape, t_shape)` + `distiller_zoo/FitNet.HintLoss`,
as `helper/loops.py` runs them for `hint`: `loss = HintLoss()(ConvReg(f_s), f_t)`. One case per
convolution ConvReg builds (student H -> teacher H): `same` 4 -> 4 (1x1), `stride` 6 -> 3 (3x3
stride 2), `transpose` 2 -> 4 (4x4 stride-2 transposed), `valid` 5 -> 3 (valid 3x3). Maps are
ReLU of noise (the hint layer's maps are post-ReLU). ConvReg's weights follow
tests/reference/weights.py's rules and are stored as they are (`<case>/init/<name>`).
"""
import numpy as np

from method_vectors import load

REPO = 'repdistiller'
SEED = 3300
BATCH = 3
C_S, C_T = 2, 3
CASES = {'same': (4, 4), 'stride': (6, 3), 'transpose': (2, 4), 'valid': (5, 3)}


def make(repo_dir):
  import torch  # pylint: disable=g-import-not-at-top
  from make_vectors import f32, load_generated, nhwc  # pylint: disable=g-import-not-at-top
  fitnet = load(repo_dir, 'distiller_zoo/FitNet.py')
  util = load(repo_dir, 'models/util.py')
  out = {}
  for n, (case, (s_h, t_h)) in enumerate(CASES.items()):
    seed = SEED + 10 * n
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    s_np = np.maximum(rng.standard_normal((BATCH, s_h, s_h, C_S)), 0).astype(np.float32)
    t_np = np.maximum(rng.standard_normal((BATCH, t_h, t_h, C_T)), 0).astype(np.float32)
    f_s = torch.from_numpy(s_np.transpose(0, 3, 1, 2)).requires_grad_()
    f_t = torch.from_numpy(t_np.transpose(0, 3, 1, 2))
    regress = util.ConvReg(f_s.shape, f_t.shape).train()
    load_generated(regress, seed + 1, 1.0)
    init = {k: f32(v) for k, v in regress.state_dict().items()
            if not k.endswith('num_batches_tracked')}
    loss = fitnet.HintLoss()(regress(f_s), f_t)
    loss.backward()
    add = lambda d, prefix: out.update({f'{case}/{prefix}{k}': v for k, v in d.items()})
    add({'student': s_np, 'teacher': t_np, 'loss': f32(loss), 'grad_student': nhwc(f_s.grad)}, '')
    add(init, 'init/')
    add({k: f32(p.grad) for k, p in regress.named_parameters()}, 'grad_sd/')
    add({k: f32(v) for k, v in regress.state_dict().items()
         if k.endswith('running_mean') or k.endswith('running_var')}, 'sd_after/')
  return out

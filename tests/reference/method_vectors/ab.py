"""Golden vectors of `ab` (activation boundaries) from RepDistiller's own code.

One train-mode step of RepDistiller's `models/util.Connector` + `distiller_zoo/AB.ABLoss`, as its
`helper/pretrain.py` init() runs them for `abound`: `loss = sum(ABLoss(connector(g_s), g_t))`.
(The main stage's AB term is 0 in the benchmark, helper/loops.py:171-173, so this is the only
loss.) The five pairs cover every connector: identity (equal channels and height), 1x1 conv
(equal height), 3x3 stride-2 conv (s = 2t), 4x4 stride-2 transposed conv (2s = t), and a valid
2x2 conv (s = t + 1). Feature maps are signed (the benchmark feeds pre-activation maps).
"""
import numpy as np

from method_vectors import load

REPO = 'repdistiller'
SEED = 3100
BATCH = 4
# (student C, H), (teacher C, H) per pair, shallow to deep.
PAIRS = [((3, 4), (3, 4)), ((3, 4), (5, 4)), ((3, 4), (4, 2)), ((2, 2), (3, 4)),
         ((3, 3), (4, 2))]


def make(repo_dir):
  import torch  # pylint: disable=g-import-not-at-top
  from make_vectors import f32, load_generated, nhwc  # pylint: disable=g-import-not-at-top
  ab = load(repo_dir, 'distiller_zoo/AB.py')
  util = load(repo_dir, 'models/util.py')
  torch.manual_seed(SEED)
  rng = np.random.default_rng(SEED)
  s_np = [(1.5 * rng.standard_normal((BATCH, h, h, c))).astype(np.float32) for (c, h), _ in PAIRS]
  t_np = [rng.standard_normal((BATCH, h, h, c)).astype(np.float32) for _, (c, h) in PAIRS]
  s_shapes = [(BATCH, c, h, h) for (c, h), _ in PAIRS]
  t_shapes = [(BATCH, c, h, h) for _, (c, h) in PAIRS]
  connector = util.Connector(s_shapes, t_shapes).train()
  out = load_generated(connector, SEED, 1.0)
  g_s = [torch.from_numpy(f.transpose(0, 3, 1, 2)).requires_grad_() for f in s_np]
  g_t = [torch.from_numpy(f.transpose(0, 3, 1, 2)) for f in t_np]
  losses = ab.ABLoss(len(PAIRS))(connector(g_s), g_t)
  loss = sum(losses)
  loss.backward()
  out.update({'loss': f32(loss), 'per_pair': f32(torch.stack(losses)),
              'margin': np.float64(1.0)})
  out.update({f'student/{i}': f for i, f in enumerate(s_np)})
  out.update({f'teacher/{i}': f for i, f in enumerate(t_np)})
  out.update({f'grad_student/{i}': nhwc(f.grad) for i, f in enumerate(g_s)})
  out.update({f'grad_sd/{k}': f32(p.grad) for k, p in connector.named_parameters()})
  out.update({f'sd_after/{k}': f32(v) for k, v in connector.state_dict().items()
              if k.endswith('running_mean') or k.endswith('running_var')})
  return out

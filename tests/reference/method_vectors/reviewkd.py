"""Golden vectors of ReviewKD: one train-mode step of the original `ReviewKD` module (its ABFs)
and `hcl` (CIFAR-100/model/reviewkd.py), weighted by train.py's warm-up
`min(1, epoch / kd_warm_up)` (train.py:225, 0-based epoch; not a function there, so restated).

The original `ReviewKD` runs a student network; a stand-in returns fixed feature maps
([f1, f2, f3, f4], f4 the B x D x 1 x 1 embedding), as `is_feat=True` does. Two cases, prefix
`c{k}/`: equal student and teacher sizes (the CIFAR pairs), and teacher maps larger than the
student's, of sizes that do not divide (the original's `out_shapes`).
Per case: `seed`, `gain`, `keys`, `shapes` (the state_dict, tests/reference/weights.py rules),
`student_seed`, `student_shapes`, `teacher_seed`, `teacher_shapes` (channels-last; the last
of each is the embedding, 1 x 1), `epoch0` (the original's 0-based epoch), `warmup`;
outputs `hcl`, `loss` (hcl x warm-up), `grad_student/{i}` (d loss / d the student maps, the
embedding last, channels-last), `grad_sd/<name>`, `sd_after/<name>`.
"""
import importlib
import importlib.util
import os
import pathlib
import sys

import numpy as np
import torch

REPO = 'reviewkd'
BATCH = 4
CASES = (  # (student shapes, teacher shapes), the embedding last
    ([(BATCH, 8, 8, 3), (BATCH, 4, 4, 4), (BATCH, 2, 2, 5), (BATCH, 1, 1, 6)],
     [(BATCH, 8, 8, 4), (BATCH, 4, 4, 5), (BATCH, 2, 2, 7), (BATCH, 1, 1, 7)]),
    ([(BATCH, 6, 6, 3), (BATCH, 3, 3, 4), (BATCH, 2, 2, 5), (BATCH, 1, 1, 6)],
     [(BATCH, 8, 8, 4), (BATCH, 4, 4, 5), (BATCH, 2, 2, 7), (BATCH, 1, 1, 7)]),
)
EPOCH0, WARMUP, GAIN = 4, 20.0, 1.0


def _load_package(repo_dir: str):
  """CIFAR-100/model as a package of its own name (not `model`, which may clash)."""
  root = os.path.join(repo_dir, 'CIFAR-100', 'model')
  name = 'reviewkd_original_model'
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, '__init__.py'),
                                                  submodule_search_locations=[root])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
  return importlib.import_module(f'{name}.reviewkd')


def _weights():
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import weights  # pylint: disable=g-import-not-at-top
  return weights


def padded(shapes):
  return np.array([list(s) + [-1] * (4 - len(s)) for s in shapes], np.int64)


class _Student(torch.nn.Module):
  """Stands in for the student network: `(features, logits)` as `is_feat=True` returns."""

  def __init__(self, features):
    super().__init__()
    self.features = features

  def forward(self, x, is_feat=False):
    del x, is_feat
    return self.features, None


def make(repo_dir: str) -> dict:
  rk = _load_package(repo_dir)
  rk.ReviewKD.to = lambda self, *args, **kwargs: self  # its __init__ moves itself to CUDA
  weights = _weights()
  torch.manual_seed(0)
  out = {}
  for k, (s_shapes, t_shapes) in enumerate(CASES):
    seed, s_seed, t_seed = 40 + 3 * k, 41 + 3 * k, 42 + 3 * k
    student = weights.features(s_seed, s_shapes)
    teacher = weights.features(t_seed, t_shapes)
    feat_s = [torch.tensor(f.transpose(0, 3, 1, 2), requires_grad=True) for f in student]
    feat_t = [torch.tensor(f.transpose(0, 3, 1, 2)) for f in teacher]
    shapes = [1] + [s[1] for s in s_shapes[-2::-1]]   # deepest first, as the original's tables
    out_shapes = [1] + [s[1] for s in t_shapes[-2::-1]]
    module = rk.ReviewKD(_Student(feat_s), [s[-1] for s in s_shapes], [s[-1] for s in t_shapes],
                         shapes, out_shapes)
    sd = {n: v for n, v in module.state_dict().items() if not n.endswith('num_batches_tracked')}
    keys, key_shapes = list(sd), [tuple(v.shape) for v in sd.values()]
    drawn = weights.state_dict(seed, keys, key_shapes, GAIN)
    module.load_state_dict({n: torch.tensor(v) for n, v in drawn.items()}, strict=False)
    module.train()
    results, _ = module(torch.zeros(BATCH, 3, 2, 2))
    hcl = rk.hcl(results, feat_t)
    loss = hcl * min(1, EPOCH0 / WARMUP)  # train.py:225, without --kd-loss-weight
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, feat_s + list(params.values()))
    p = f'c{k}/'
    out.update({
        p + 'seed': np.int32(seed), p + 'gain': np.float32(GAIN), p + 'keys': np.array(keys),
        p + 'shapes': padded(key_shapes), p + 'student_seed': np.int32(s_seed),
        p + 'student_shapes': padded(s_shapes), p + 'teacher_seed': np.int32(t_seed),
        p + 'teacher_shapes': padded(t_shapes), p + 'epoch0': np.int32(EPOCH0),
        p + 'warmup': np.float32(WARMUP), p + 'hcl': np.float32(hcl.item()),
        p + 'loss': np.float32(loss.item()),
    })
    for i, g in enumerate(grads[:len(feat_s)]):
      out[p + f'grad_student/{i}'] = g.numpy().transpose(0, 2, 3, 1).astype(np.float32)
    for name, g in zip(params, grads[len(feat_s):]):
      out[p + f'grad_sd/{name}'] = g.numpy().astype(np.float32)
    for name, value in module.state_dict().items():
      if name.endswith('running_mean') or name.endswith('running_var'):
        out[p + f'sd_after/{name}'] = value.numpy().astype(np.float32)
  return out

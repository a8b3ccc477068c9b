"""Golden vectors of SemCKD: one train-mode step of the original `SelfA` (models/util.py) and
`SemCKDLoss` (distiller_zoo/SemCKD.py), loaded by file path (no `models` package clash).

Stored: `batch_size` (N, the MLPs' input width, = the batch here); `seed`, `gain`, `keys`,
`shapes`: SelfA's state_dict (tests/reference/weights.py rules, non-trivial running
statistics); `student_seed`, `student_shapes` (S x 4), `teacher_seed`, `teacher_shapes`
(T x 4): the feature maps, `weights.features` (channels-last). Outputs: `loss`; `attention`
(the original's B x S x T weights, transposed to B x T x S); `grad_student/{i}` (channels-last);
`grad_sd/<name>` for every parameter; `sd_after/<name>` every running mean and variance.
"""
import importlib.util
import os
import pathlib
import sys

import numpy as np
import torch

REPO = 'semckd'
BATCH = 8
# Three student and two teacher maps: every pair pools one side (student 8 -> 6 and 8 -> 3,
# 4 -> 3; teacher 6 -> 4, 6 -> 2 and 3 -> 2), sizes that divide and sizes that do not.
STUDENT_SHAPES = [(BATCH, 8, 8, 3), (BATCH, 4, 4, 4), (BATCH, 2, 2, 5)]
TEACHER_SHAPES = [(BATCH, 6, 6, 4), (BATCH, 3, 3, 6)]
SEED, STUDENT_SEED, TEACHER_SEED, GAIN = 31, 32, 33, 1.0


def _load(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _weights():
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import weights  # pylint: disable=g-import-not-at-top
  return weights


def padded(shapes):
  return np.array([list(s) + [-1] * (4 - len(s)) for s in shapes], np.int64)


def make(repo_dir: str) -> dict:
  util = _load('semckd_original_util', os.path.join(repo_dir, 'models', 'util.py'))
  zoo = _load('semckd_original_loss', os.path.join(repo_dir, 'distiller_zoo', 'SemCKD.py'))
  weights = _weights()
  torch.manual_seed(0)
  s_n = [s[-1] for s in STUDENT_SHAPES]
  t_n = [s[-1] for s in TEACHER_SHAPES]
  module = util.SelfA(len(s_n), len(t_n), BATCH, s_n, t_n)
  sd = {k: v for k, v in module.state_dict().items() if not k.endswith('num_batches_tracked')}
  keys, shapes = list(sd), [tuple(v.shape) for v in sd.values()]
  drawn = weights.state_dict(SEED, keys, shapes, GAIN)
  module.load_state_dict({k: torch.tensor(v) for k, v in drawn.items()}, strict=False)
  module.train()

  student = weights.features(STUDENT_SEED, STUDENT_SHAPES)
  teacher = weights.features(TEACHER_SEED, TEACHER_SHAPES)
  feat_s = [torch.tensor(f.transpose(0, 3, 1, 2), requires_grad=True) for f in student]
  feat_t = [torch.tensor(f.transpose(0, 3, 1, 2)) for f in teacher]
  cuda = torch.Tensor.cuda
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # SemCKDLoss allocates on .cuda()
  try:
    s_value, f_target, weight = module(feat_s, feat_t)
    loss = zoo.SemCKDLoss()(s_value, f_target, weight)
  finally:
    torch.Tensor.cuda = cuda
  params = dict(module.named_parameters())
  grads = torch.autograd.grad(loss, feat_s + list(params.values()))
  out = {
      'batch_size': np.int32(BATCH), 'seed': np.int32(SEED), 'gain': np.float32(GAIN),
      'keys': np.array(keys), 'shapes': padded(shapes),
      'student_seed': np.int32(STUDENT_SEED), 'student_shapes': padded(STUDENT_SHAPES),
      'teacher_seed': np.int32(TEACHER_SEED), 'teacher_shapes': padded(TEACHER_SHAPES),
      'loss': np.float32(loss.item()),
      'attention': weight.detach().numpy().transpose(0, 2, 1).astype(np.float32),
  }
  for i, g in enumerate(grads[:len(feat_s)]):
    out[f'grad_student/{i}'] = g.numpy().transpose(0, 2, 3, 1).astype(np.float32)
  for name, g in zip(params, grads[len(feat_s):]):
    out[f'grad_sd/{name}'] = g.numpy().astype(np.float32)
  for name, value in module.state_dict().items():
    if name.endswith('running_mean') or name.endswith('running_var'):
      out[f'sd_after/{name}'] = value.numpy().astype(np.float32)
  return out

"""Golden vectors of PKT: RepDistiller `distiller_zoo/PKT.py` on two small embeddings.

Arrays: `student_embedding` (B x D_s), `teacher_embedding` (B x D_t), `loss`,
`grad_student_embedding` (d loss / d student embedding).
"""
import importlib.util
import os

import numpy as np
import torch

REPO = 'repdistiller'


def load(repo_dir: str, relpath: str):
  """A module of the original code, by file path (another checkout may have the same names)."""
  name = 'repdistiller_' + relpath.replace('/', '_').replace('.py', '')
  spec = importlib.util.spec_from_file_location(name, os.path.join(repo_dir, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def f32(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().astype(np.float32)


def make(repo_dir: str) -> dict:
  torch.manual_seed(0)
  rng = np.random.default_rng(101)
  # Post-ReLU-like pooled embeddings: non-negative, a few exact zeros.
  s = np.maximum(rng.standard_normal((6, 5)) + 0.3, 0).astype(np.float32)
  t = np.maximum(rng.standard_normal((6, 7)) + 0.3, 0).astype(np.float32)
  pkt = load(repo_dir, 'distiller_zoo/PKT.py').PKT()
  pkt.train()
  f_s = torch.tensor(s, requires_grad=True)
  loss = pkt(f_s, torch.tensor(t))
  loss.backward()
  return {'student_embedding': s, 'teacher_embedding': t, 'loss': f32(loss),
          'grad_student_embedding': f32(f_s.grad)}

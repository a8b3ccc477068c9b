"""Golden vectors of CRD: two training steps of RepDistiller's `CRDLoss` (crd/criterion.py,
crd/memory.py) with negatives drawn as dataset/cifar100.py's `CIFAR100InstanceSample` does in
mode 'exact' (other classes, `replace = k > len(cls_negative)`), stored as `contrast_idx`.

Sizes: batch 4, s_dim 6, t_dim 10, feat_dim 8, N 24 examples of 3 classes, nce_k 10, nce_t 0.07,
nce_m 0.5. The module's initial state (embedding heads, PyTorch's default init under
`torch.manual_seed(0)`; both banks, uniform on [-s, s)) is stored: it is tiny. Step 2 reuses
two examples of step 1, so it reads bank rows step 1 moved; it must keep step 1's Z.

Arrays:
- `n_data`, `nce_k`, `nce_t`, `nce_m`, `feat_dim`, `train_labels` (N): the set-up.
- `init/<name>`: the state_dict before step 1 (`embed_s.linear.weight` (out x in), ...,
  `contrast.memory_v1` (student bank), `contrast.memory_v2` (teacher bank)).
- `step{1,2}/f_s` (B x s_dim), `f_t` (B x t_dim), `index` (B), `labels` (B), `contrast_idx`
  (B x (K + 1), column 0 = index): the inputs.
- `step{1,2}/loss`; `grad_f_s`: d loss / d f_s; `grad/<name>`: d loss / d the embedding heads'
  parameters (PyTorch names, gradients of that step alone); `memory_v1`, `memory_v2`: the banks
  after the step; `z`: (Z_v1, Z_v2) after the step (Z_v1 normalises the student-anchor scores).
"""
import sys
import types

import numpy as np
import torch

REPO = 'repdistiller'

BATCH, S_DIM, T_DIM, FEAT_DIM, N_DATA, CLASSES, NCE_K = 4, 6, 10, 8, 24, 3, 10
NCE_T, NCE_M = 0.07, 0.5
SEED = 20240


def exact_negatives(rng, labels_all, index, k):
  """dataset/cifar100.py:116-168 (mode 'exact'): [index, k negatives of the other classes]."""
  rows = []
  for i in index:
    negatives = np.flatnonzero(labels_all != labels_all[i])
    replace = k > len(negatives)
    rows.append(np.hstack(([i], rng.choice(negatives, k, replace=replace))))
  return np.asarray(rows, np.int64)


def make(repo_dir: str):
  sys.path.insert(0, repo_dir)
  import crd.memory as memory  # pylint: disable=g-import-not-at-top
  from crd.criterion import CRDLoss  # pylint: disable=g-import-not-at-top
  memory.AliasMethod.cuda = lambda self: None  # CPU-only torch; the sampler is unused here

  torch.manual_seed(0)
  opt = types.SimpleNamespace(s_dim=S_DIM, t_dim=T_DIM, feat_dim=FEAT_DIM, nce_k=NCE_K,
                              nce_t=NCE_T, nce_m=NCE_M, n_data=N_DATA)
  criterion = CRDLoss(opt)
  criterion.train()
  rng = np.random.default_rng(SEED)
  train_labels = np.arange(N_DATA) % CLASSES
  rng.shuffle(train_labels)
  out = {'n_data': np.int32(N_DATA), 'nce_k': np.int32(NCE_K), 'nce_t': np.float32(NCE_T),
         'nce_m': np.float32(NCE_M), 'feat_dim': np.int32(FEAT_DIM),
         'train_labels': train_labels.astype(np.int32)}
  params = {n: p for n, p in criterion.named_parameters()}
  state = criterion.state_dict()
  for name in ('embed_s.linear.weight', 'embed_s.linear.bias', 'embed_t.linear.weight',
               'embed_t.linear.bias', 'contrast.memory_v1', 'contrast.memory_v2'):
    out[f'init/{name}'] = state[name].detach().numpy().astype(np.float32).copy()

  first = rng.permutation(N_DATA)[:BATCH]
  others = np.setdiff1d(np.arange(N_DATA), first)
  second = np.concatenate([first[:2], rng.choice(others, BATCH - 2, replace=False)])
  for step, index in ((1, first), (2, second)):
    f_s = rng.standard_normal((BATCH, S_DIM)).astype(np.float32)
    f_t = np.maximum(rng.standard_normal((BATCH, T_DIM)), 0).astype(np.float32)
    contrast_idx = exact_negatives(rng, train_labels, index, NCE_K)
    f_s_t = torch.tensor(f_s, requires_grad=True)
    for p in params.values():
      p.grad = None
    loss = criterion(f_s_t, torch.tensor(f_t), torch.tensor(index, dtype=torch.long),
                     torch.tensor(contrast_idx, dtype=torch.long))
    loss.backward()
    prefix = f'step{step}/'
    out.update({prefix + 'f_s': f_s, prefix + 'f_t': f_t, prefix + 'index': index.astype(np.int32),
                prefix + 'labels': train_labels[index].astype(np.int32),
                prefix + 'contrast_idx': contrast_idx.astype(np.int32),
                prefix + 'loss': np.float32(loss.item()),
                prefix + 'grad_f_s': f_s_t.grad.numpy().astype(np.float32).copy(),
                prefix + 'memory_v1': criterion.contrast.memory_v1.numpy().astype(np.float32).copy(),
                prefix + 'memory_v2': criterion.contrast.memory_v2.numpy().astype(np.float32).copy(),
                prefix + 'z': criterion.contrast.params[2:4].detach().numpy().astype(np.float32).copy()})
    for name, p in params.items():
      out[f'{prefix}grad/{name}'] = p.grad.numpy().astype(np.float32).copy()
  return out

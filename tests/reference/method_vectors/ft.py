"""Golden vectors of `ft` (factor transfer) from RepDistiller's own code, both stages.

- `pretrain/`: one train-mode step of `models/util.Paraphraser(t_shape)` (k = 0.5, no batch
  norm) on the teacher's map with `nn.MSELoss()(rec, f_t)`, as `helper/pretrain.py` init() runs it
  for `factor`.
- `main/`, `main_pool/`: one step of the main stage as `helper/loops.py` runs it:
  `FactorTransfer()(Translator(s_shape, t_shape)(f_s), Paraphraser(f_t, is_factor=True))`, the
  translator in train mode (batch norm), the paraphraser in eval mode (frozen: not in the
  benchmark's optimizer, so its gradients are not stored). `main` has equal map sizes (3 x 3),
  `main_pool` a 3 x 3 student and a 5 x 5 teacher map (the teacher's factor is pooled, 5 -> 3).
Weights are redrawn from `<case>/<module>/{seed,gain,keys,shapes}` (tests/reference/weights.py).
"""
import numpy as np

from method_vectors import load

REPO = 'repdistiller'
SEED = 3200
BATCH = 4
C_S, C_T = 3, 4
CASES = {'pretrain': (None, 3), 'main': (3, 3), 'main_pool': (3, 5)}  # student H, teacher H


def make(repo_dir):
  import torch  # pylint: disable=g-import-not-at-top
  from make_vectors import f32, load_generated, nhwc  # pylint: disable=g-import-not-at-top
  ft = load(repo_dir, 'distiller_zoo/FT.py')
  util = load(repo_dir, 'models/util.py')
  out = {}
  for n, (case, (s_h, t_h)) in enumerate(CASES.items()):
    seed = SEED + 10 * n
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t_np = np.maximum(rng.standard_normal((BATCH, t_h, t_h, C_T)), 0).astype(np.float32)
    f_t = torch.from_numpy(t_np.transpose(0, 3, 1, 2))
    paraphraser = util.Paraphraser(f_t.shape)
    add = lambda d, prefix: out.update({f'{case}/{prefix}{k}': v for k, v in d.items()})
    add(load_generated(paraphraser, seed + 1, 1.0), 'paraphraser/')
    add({'teacher': t_np}, '')
    if case == 'pretrain':
      paraphraser.train()
      _, rec = paraphraser(f_t)
      loss = torch.nn.MSELoss()(rec, f_t)
      loss.backward()
      add({'loss': f32(loss)}, '')
      add({k: f32(p.grad) for k, p in paraphraser.named_parameters()}, 'grad_sd/paraphraser/')
      continue
    s_np = np.maximum(rng.standard_normal((BATCH, s_h, s_h, C_S)), 0).astype(np.float32)
    f_s = torch.from_numpy(s_np.transpose(0, 3, 1, 2)).requires_grad_()
    translator = util.Translator(f_s.shape, f_t.shape).train()
    add(load_generated(translator, seed + 2, 1.0), 'translator/')
    paraphraser.eval()
    loss = ft.FactorTransfer()(translator(f_s), paraphraser(f_t, is_factor=True))
    loss.backward()
    add({'student': s_np, 'loss': f32(loss), 'grad_student': nhwc(f_s.grad)}, '')
    add({k: f32(p.grad) for k, p in translator.named_parameters()}, 'grad_sd/translator/')
    add({k: f32(v) for k, v in translator.state_dict().items()
         if k.endswith('running_mean') or k.endswith('running_var')}, 'sd_after/translator/')
  return out

"""The Python side of launch/gpu_compare.sh: check the machine, time the official PyTorch AFD
step, and write the comparison table.

  python3 launch/gpu_compare.py check --official-dir DIR
  python3 launch/gpu_compare.py official --official-dir DIR --teacher wrn40x2 --student wrn16x2 \
      --batch 64 --dtype float32 [--image-size 32] [--num-classes 100] [--steps 30] ...
  python3 launch/gpu_compare.py table RESULTS.jsonl [--out TABLE.md]

`official` runs the training step of the official AFD code (a checkout of
github.com/clovaai/attention-feature-distillation, imported from DIR as it is) the way
`python -m afd_jax.bench --method all` times ours: ce (the student alone, cross-entropy), kd (+ the
frozen teacher's forward and 0.9 KD at T 4) and afd (+ 200 L_AFD, qk_dim 128), SGD 0.05,
momentum 0.9, weight decay 5e-4 (the official main.py's defaults), one synthetic batch, interleaved
in rounds, each step waited for; it prints one JSON object in the benchmark's format. bfloat16
runs the step under torch.autocast (the official code itself has no mixed precision). `table`
needs plain Python only; `check` and `official` need torch (and `check` jax).
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types

METHODS = ('ce', 'kd', 'afd')
# The official main.py's defaults.
RECIPE = types.SimpleNamespace(lr=0.05, momentum=0.9, weight_decay=5e-4, alpha=0.9,
                               temperature=4.0, beta=200.0, qk_dim=128)


def fail(message: str):
  sys.exit(f'gpu_compare: {message}')


def load_official(directory: str):
  """The official code's models, AFD, DistillKL, LAYER and unique_shape, imported from
  `directory` (its own top-level `models`, `distill` and `utils`)."""
  if not os.path.isfile(os.path.join(directory, 'distill', 'AFD.py')):
    fail(f'{directory} is not a checkout of clovaai/attention-feature-distillation '
         '(no distill/AFD.py)')
  sys.path.insert(0, os.path.abspath(directory))
  try:
    import models  # pylint: disable=g-import-not-at-top
    from distill import AFD, DistillKL  # pylint: disable=g-import-not-at-top
    from utils import LAYER, unique_shape  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    fail(f'cannot import the official code from {directory}: {e}')
  return types.SimpleNamespace(models=models, AFD=AFD, DistillKL=DistillKL, LAYER=LAYER,
                               unique_shape=unique_shape)


def check(args) -> int:
  """Refuse, in one line, a machine that cannot run the comparison: before any timing starts."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    fail('torch is not installed (the official step needs PyTorch with CUDA)')
  load_official(args.official_dir)
  if not torch.cuda.is_available():
    fail(f'torch {torch.__version__} sees no CUDA device')
  for name in ('jax', 'flax', 'optax'):
    if importlib.util.find_spec(name) is None:
      fail(f'{name} is not installed (our step needs jax with CUDA, flax and optax)')
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'gpu':
    fail(f'JAX runs on {jax.default_backend()}, not on a GPU (install jax with CUDA)')
  print(f'ok: torch {torch.__version__} on {torch.cuda.get_device_name(0)}, jax {jax.__version__} '
        f'on {jax.devices()[0].device_kind}')
  return 0


def afd_args(off, teacher, student, image_size: int, names):
  """The AFD module's arguments as the official main.py derives them (feature shapes from a
  two-image forward in eval mode, taps from its LAYER table)."""
  import torch  # pylint: disable=g-import-not-at-top
  for name in names:
    if name not in off.LAYER:
      fail(f'the official code has no taps (utils.LAYER) for {name}')
  teacher.eval()
  student.eval()
  with torch.no_grad():
    data = torch.randn(2, 3, image_size, image_size)
    feat_t, _ = teacher(data, is_feat=True)
    feat_s, _ = student(data, is_feat=True)
  a = types.SimpleNamespace(guide_layers=off.LAYER[names[0]], hint_layers=off.LAYER[names[1]],
                            qk_dim=RECIPE.qk_dim)
  a.s_shapes = [feat_s[i].size() for i in a.hint_layers]
  a.t_shapes = [feat_t[i].size() for i in a.guide_layers]
  a.n_t, a.unique_t_shapes = off.unique_shape(a.t_shapes)
  return a


class OfficialCase:
  """One method's official modules, optimizer and synthetic batch on `device`."""

  def __init__(self, method: str, off, args, device):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.method, self.device, self.dtype = torch, method, device, args.dtype
    torch.manual_seed(0)  # the same student (and teacher) in every case
    build = lambda name: off.models.__dict__[name](num_classes=args.num_classes)
    self.student = build(args.student)
    self.teacher = build(args.teacher) if method != 'ce' else None
    self.afd = (off.AFD(afd_args(off, self.teacher, self.student, args.image_size,
                                 (args.teacher, args.student))) if method == 'afd' else None)
    trainable = torch.nn.ModuleList([self.student] + ([self.afd] if self.afd else []))
    self.optimizer = torch.optim.SGD(trainable.parameters(), lr=RECIPE.lr,
                                     momentum=RECIPE.momentum, weight_decay=RECIPE.weight_decay)
    for module in (self.student, self.teacher, self.afd):
      if module is not None:
        module.to(device).train()
    if self.teacher is not None:
      self.teacher.eval()
    self.ce, self.kl = torch.nn.CrossEntropyLoss(), off.DistillKL(RECIPE.temperature)
    gen = torch.Generator().manual_seed(0)
    self.images = torch.randn(args.batch, 3, args.image_size, args.image_size,
                              generator=gen).to(device)
    self.labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    self.times, self.first_loss = [], None

  def loss(self):
    torch = self.torch
    with torch.autocast(self.device.type, dtype=torch.bfloat16,
                        enabled=self.dtype == 'bfloat16'):
      if self.teacher is not None:
        with torch.no_grad():
          feat_t, out_t = self.teacher(self.images, is_feat=True)
      feat_s, out_s = self.student(self.images, is_feat=True)
      loss = self.ce(out_s, self.labels)
      if self.teacher is not None:
        loss = loss + RECIPE.alpha * self.kl(out_s, out_t)
      if self.afd is not None:
        loss = loss + RECIPE.beta * self.afd(feat_s, [f.detach() for f in feat_t])
    return loss

  def step(self):
    loss = self.loss()
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    return loss

  def run(self, steps: int, record: bool) -> None:
    for _ in range(steps):
      start = time.perf_counter()
      loss = self.step()
      if self.device.type == 'cuda':
        self.torch.cuda.synchronize(self.device)
      if record:
        self.times.append(time.perf_counter() - start)
      elif self.first_loss is None:
        self.first_loss = loss.item()


def commit_of(directory: str) -> str:
  try:
    return subprocess.run(['git', '-C', directory, 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ''


def official(args) -> int:
  """Time the official ce, kd and afd steps interleaved in rounds; print one JSON object."""
  import torch  # pylint: disable=g-import-not-at-top
  off = load_official(args.official_dir)
  if args.device == 'cuda' and not torch.cuda.is_available():
    fail(f'torch {torch.__version__} sees no CUDA device')
  device = torch.device(args.device)
  torch.backends.cudnn.benchmark = True  # as the official main.py
  cases = [OfficialCase(m, off, args, device) for m in METHODS]
  for case in cases:
    case.run(max(1, args.warmup), record=False)
  rounds = max(1, args.rounds)
  for i in range(rounds):
    for case in cases:
      case.run(args.steps // rounds + (i < args.steps % rounds), record=True)
  results = [{'method': c.method, 'median_step_ms': 1e3 * statistics.median(c.times),
              'images_per_s': args.batch / statistics.median(c.times),
              'steps_timed': len(c.times), 'first_loss': c.first_loss} for c in cases]
  by = {r['method']: r['median_step_ms'] for r in results}
  cuda = device.type == 'cuda'
  print(json.dumps({
      'implementation': 'official', 'official_commit': commit_of(args.official_dir),
      'device': f'{torch.cuda.get_device_name(device) if cuda else "cpu"} x 1',
      'backend': f'torch {torch.__version__}' + (f', CUDA {torch.version.cuda}' if cuda else ''),
      'teacher': args.teacher, 'student': args.student, 'batch': args.batch, 'dtype': args.dtype,
      'image_size': args.image_size, 'num_classes': args.num_classes, 'bn_group_size': 0,
      'peak_memory_bytes': torch.cuda.max_memory_allocated(device) if cuda else None,
      'results': results, 'afd_over_kd': by['afd'] / by['kd'], 'kd_over_ce': by['kd'] / by['ce']}))
  return 0


def read_reports(path: str):
  try:
    with open(path) as f:
      reports = [json.loads(line) for line in f if line.strip()]
  except (OSError, json.JSONDecodeError) as e:
    fail(f'cannot read the results {path}: {e}')
  if not reports:
    fail(f'{path} holds no results')
  return reports


def case_of(r) -> tuple:
  return (r['teacher'], r['student'], r['image_size'], r['batch'], r['dtype'])


def row(r, reference) -> str:
  """One implementation's markdown row; ours/official against `reference` (None: none)."""
  ms = {x['method']: x['median_step_ms'] for x in r['results']}
  ips = {x['method']: x['images_per_s'] for x in r['results']}
  ours = r.get('implementation') != 'official'
  code = 'afd_jax' if ours else 'official'
  if r.get('bn_group_size'):
    code += f', BN groups of {r["bn_group_size"]}'
  ratio = '-'
  if ours and reference:
    ref = {x['method']: x['images_per_s'] for x in reference['results']}
    ratio = ' / '.join(f'{ips[m] / ref[m]:.2f}' if m in ips and m in ref else '-'
                       for m in METHODS)
  teacher, student, size, batch, dtype = case_of(r)
  precision = dtype if ours or dtype == 'float32' else f'{dtype} (autocast)'
  cells = ([f'{teacher} -> {student}', f'{size}x{size}', f'{batch}', precision, code]
           + [f'{ms[m]:.2f}' if m in ms else '-' for m in METHODS]
           + [f'{ips[m]:,.0f}' if m in ips else '-' for m in METHODS]
           + [f'**{ms["afd"] / ms["kd"]:.3f}**' if 'afd' in ms and 'kd' in ms else '-', ratio])
  return '| ' + ' | '.join(cells) + ' |'


def table(args) -> int:
  """One markdown table of every case, ours and the official code's rows side by side."""
  reports = read_reports(args.results)
  officials = {case_of(r): r for r in reports if r.get('implementation') == 'official'}
  cases = list(dict.fromkeys(case_of(r) for r in reports))
  devices = sorted({f'{r["device"]} ({r.get("backend", "")})' for r in reports})
  commits = sorted({r['official_commit'] for r in officials.values() if r.get('official_commit')})
  lines = [f'Devices: {"; ".join(devices)}.'
           + (f' Official code at {", ".join(commits)}.' if commits else ''), '',
           '| teacher -> student | image | batch | dtype | code | ce ms | kd ms | afd ms '
           '| ce img/s | kd img/s | afd img/s | **afd/kd** | ours/official img/s (ce / kd / afd) |',
           '|' + '---|' * 13]
  for case in cases:
    mine = [r for r in reports if case_of(r) == case and r.get('implementation') != 'official']
    lines += [row(r, officials.get(case)) for r in mine]
    if case in officials:
      lines.append(row(officials[case], None))
  text = '\n'.join(lines) + '\n'
  print(text, end='')
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(text)
  return 0


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  sub.add_parser('check').add_argument('--official-dir', required=True)
  timing = sub.add_parser('official')
  timing.add_argument('--official-dir', required=True)
  for name, default in (('teacher', 'wrn40x2'), ('student', 'wrn16x2')):
    timing.add_argument(f'--{name}', default=default)
  for name, default in (('batch', 64), ('image-size', 32), ('num-classes', 100), ('steps', 30),
                        ('rounds', 3), ('warmup', 5)):
    timing.add_argument(f'--{name}', type=int, default=default)
  timing.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  timing.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
  tab = sub.add_parser('table')
  tab.add_argument('results', help='JSON lines of afd_jax.bench --json and of `official`')
  tab.add_argument('--out', default='', help='also write the table to this file')
  args = parser.parse_args(argv)
  if args.command == 'official' and min(args.batch, args.steps, args.image_size) < 1:
    parser.error('--batch, --steps and --image-size must be positive')
  return args


def main(argv=None) -> int:
  args = parse(argv)
  return {'check': check, 'official': official, 'table': table}[args.command](args)


if __name__ == '__main__':
  sys.exit(main())

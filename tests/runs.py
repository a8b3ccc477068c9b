"""Helpers for tests that run the trainer: tiny configs, and the CLI in a subprocess or in this
process."""
import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Dict, List, Optional

from configs import digits

REPO = pathlib.Path(__file__).resolve().parents[1]

# A tiny distillation run on digits: resnet8 <- resnet8 (untrained teacher), AFD + KD.
TINY = {
    'teacher.name': 'resnet8', 'teacher.checkpoint': 'random', 'student.name': 'resnet8',
    'afd.qk_dim': 16, 'batch_size': 32, 'eval_batch_size': 360, 'num_epochs': 1,
    'log_every_steps': 1, 'checkpoint_every_steps': 5, 'keep_checkpoints': 100,
    'keep_best': False, 'plot_attention': False,
}


def tiny_config(data_dir: str, run: str = 'afd', **overrides):
  """The digits config (configs/digits.py) shrunk for tests; `overrides` use '__' for '.' in keys."""
  config = digits.get_config(run)
  config.dataset.data_dir = data_dir
  for key, value in {**TINY, **{k.replace('__', '.'): v for k, v in overrides.items()}}.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  if run != 'afd':
    config.teacher.checkpoint = ''
  return config


def flag_args(data_dir: str, run: str = 'afd', **overrides) -> List[str]:
  """CLI flags for the same tiny run."""
  args = [f'--config={REPO}/configs/digits.py:{run}',
          f'--config.dataset.data_dir={data_dir}']
  settings = {**TINY, **{k.replace('__', '.'): v for k, v in overrides.items()}}
  if run != 'afd':
    settings['teacher.checkpoint'] = ''
  for key, value in settings.items():
    args.append(f'--config.{key}={value}')
  return args


def env(devices: Optional[int] = None) -> Dict[str, str]:
  """This environment for a subprocess; `devices` fake CPU devices instead of the session's 8."""
  out = dict(os.environ)
  out['PYTHONPATH'] = str(REPO) + os.pathsep + out.get('PYTHONPATH', '')
  out['PYTHONUNBUFFERED'] = '1'
  if devices is not None:
    flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', out.get('XLA_FLAGS', ''))
    out['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  return out


def cli(args: List[str], workdir: Optional[str] = None, timeout: int = 300,
        check: bool = False, devices: Optional[int] = None) -> subprocess.CompletedProcess:
  """Runs `python -m afd_jax.main ARGS --workdir=WORKDIR`."""
  cmd = [sys.executable, '-m', 'afd_jax.main', *args]
  if workdir:
    cmd.append(f'--workdir={workdir}')
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env(devices), cwd=REPO)
  if check and result.returncode != 0:
    raise AssertionError(f'{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n'
                         f'{result.stderr[-3000:]}')
  return result


def _reset_cli_flags(values) -> None:
  """Every flag back to unparsed, and config_flags' per-run `--config.*` override flags gone."""
  for name in [n for n in values if n.startswith('config.')]:
    delattr(values, name)
  values.unparse_flags()


def cli_in_process(args: List[str], workdir: Optional[str] = None) -> subprocess.CompletedProcess:
  """`python -m afd_jax.main ARGS --workdir=WORKDIR` in this process: absl's app.run with this
  argv and the CLI's own flag parser, every flag reset first; its exit code and what it printed.
  For refusals, which a subprocess proves nothing more about (an uncaught exception, which would
  be a traceback there, propagates here); it runs on the session's devices."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from afd_jax import main  # pylint: disable=g-import-not-at-top
  argv = ['afd_jax.main', *args] + ([f'--workdir={workdir}'] if workdir else [])
  _reset_cli_flags(flags.FLAGS)
  out, err, code, saved_argv = io.StringIO(), io.StringIO(), 0, sys.argv
  sys.argv = argv  # config_flags reads its --config.* overrides from sys.argv, as in the CLI
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      app.run(main.main, argv=argv, flags_parser=main.parse_flags)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
      sys.argv = saved_argv
      _reset_cli_flags(flags.FLAGS)
  return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def summary(workdir) -> dict:
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def tree_digest(folder) -> Dict[str, str]:
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out

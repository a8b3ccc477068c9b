"""Launch scripts: the TPU pod dry run prints the commands; bad use of it and of
local_multiprocess.sh is refused; the study runner runs a teacher only where a student needs it,
keeps one that reproduces, resumes a student started against the current teacher, and stops
where a student has no teacher run. The GPU comparison's dry run prints its commands, bad use is
refused in one line, and its table and (with the official code at hand) official step work."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests import runs


def script(name, *args):
  return subprocess.run(['bash', str(runs.REPO / 'launch' / name), *args], capture_output=True,
                        text=True, timeout=60, cwd=runs.REPO)


def test_tpu_pod_dry_run_prints_every_step_for_all_workers():
  result = script('tpu_pod.sh', '--dry-run', '--create', '--name', 'afd', '--zone', 'us-central2-b',
                  '--type', 'v4-32', '--', '--config=configs/imagenet.py:method=afd',
                  '--workdir=gs://bucket/runs/afd')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('gcloud compute tpus tpu-vm create afd --zone us-central2-b '
                             '--accelerator-type v4-32')
  assert any('git archive' in l for l in lines)
  ssh = [l for l in lines if 'tpu-vm ssh' in l]
  assert len(ssh) == 2 and all('--worker=all' in l for l in ssh)
  assert 'afd_jax.main' in ssh[-1] and 'method=afd' in ssh[-1] and 'gs://bucket/runs/afd' in ssh[-1]
  assert "jax\\[tpu\\]==0.10.2" in ssh[0]


def test_tpu_pod_refuses_missing_arguments():
  result = script('tpu_pod.sh', '--dry-run', '--name', 'afd')
  assert result.returncode == 2 and 'required' in result.stderr


def test_local_multiprocess_usage():
  result = script('local_multiprocess.sh')
  assert result.returncode == 2 and 'loopback' in result.stdout


def study_runner():
  """launch/fashion_mnist_study.py as a module (launch/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      'fashion_mnist_study', runs.REPO / 'launch' / 'fashion_mnist_study.py')
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  return study


def offline_study_runner(monkeypatch, fake_call):
  """The runner with each run's process replaced by `fake_call(cmd)`, commit 'new', and the
  record kept in memory only."""
  study = study_runner()
  monkeypatch.setattr(study.subprocess, 'call', lambda cmd, **unused_kwargs: fake_call(cmd))
  monkeypatch.setattr(study, 'commit', lambda: 'new')
  monkeypatch.setattr(study, 'save_record', lambda rec: None)
  return study


def write_summary(folder, **fields):
  """A finished run's summary.json (the fields the runner reads)."""
  folder.mkdir(exist_ok=True)
  (folder / 'summary.json').write_text(json.dumps(
      {'wall_time_sec': 1.0, 'total_time_sec': 1.0, **fields}))


@pytest.mark.parametrize('reproduces', [True, False])
def test_study_trains_a_teacher_only_before_a_student_that_needs_it(tmp_path, monkeypatch,
                                                                   reproduces):
  """A clone without workdirs: the student alone runs first, with no teacher; students recorded
  against their seed's teacher do not bring it back; the first student of a seed that still has
  to run does. A teacher trained again to other parameters makes the students of its seed that
  were current earlier in the pass run again."""
  study = study_runner()
  record = {'teacher-s0': {'params_sha256': 'a', 'top1': 88.0, 'commit': 'x'},
            'teacher-s1': {'params_sha256': 'b', 'top1': 88.0, 'commit': 'x'},
            'kd-s0': {'top1': 86.0, 'teacher_sha256': 'a', 'commit': 'x'},
            'kd-s1': {'top1': 86.0, 'teacher_sha256': 'b', 'commit': 'x'}}
  runs_done = []

  def fake_run(root, method, seed, rec):  # what run() records, for the runs it really runs
    key = f'{method}-s{seed}'
    if study.is_current(rec.get(key), rec, method, seed, root):
      return
    runs_done.append(key)
    if method == 'teacher':  # trained again: to the same parameters, or to new ones
      sha = rec[key]['params_sha256'] if reproduces else f'new{seed}'
      write_summary(tmp_path / key, params_sha256=sha)
      rec[key] = {**rec[key], 'params_sha256': sha}
    else:
      rec[key] = {'params_sha256': 's', 'teacher_sha256': study.teacher_sha256(root, seed)}

  monkeypatch.setattr(study, 'load_record', lambda: record)
  monkeypatch.setattr(study, 'run', fake_run)
  monkeypatch.setattr(study, 'report', lambda *a: None)
  monkeypatch.setattr('sys.argv', ['fashion_mnist_study.py', f'--root={tmp_path}',
                                   '--seeds=0,1', '--methods=none,kd,afd'])
  study.main()
  first_pass = ['none-s0', 'none-s1', 'teacher-s0', 'afd-s0', 'teacher-s1', 'afd-s1']
  assert runs_done == first_pass + ([] if reproduces else ['kd-s0', 'kd-s1'])
  for seed in (0, 1):
    for method in ('none', 'kd', 'afd'):
      assert study.is_current(record[f'{method}-s{seed}'], record, method, seed, str(tmp_path))


@pytest.mark.parametrize('same', [True, False])
def test_study_keeps_a_teacher_trained_again_to_the_same_parameters(tmp_path, monkeypatch, same):
  """A teacher whose workdir was gone runs again: the same parameters bit for bit keep its record
  (and the students that distilled it stay current); other parameters replace it."""
  record = {'teacher-s0': {'params_sha256': 'a', 'top1': 88.0, 'commit': 'old'},
            'kd-s0': {'top1': 86.0, 'teacher_sha256': 'a', 'commit': 'old'}}

  def fake_call(unused_cmd):  # the teacher's run, ending with its summary
    write_summary(tmp_path / 'teacher-s0', eval={'top1': 88.0 if same else 87.5},
                  params_sha256='a' if same else 'b')
    return 0

  study = offline_study_runner(monkeypatch, fake_call)
  study.run(str(tmp_path), 'teacher', 0, record)
  note = ' '.join(study.teacher_note(str(tmp_path), [0], record))
  if same:
    assert record['teacher-s0'] == {'params_sha256': 'a', 'top1': 88.0, 'commit': 'old',
                                    'reproduced': ['new']}
    assert 'bit for bit' in note and 'seed 0 (trained at old, again at new)' in note
  else:
    assert record['teacher-s0']['replaces'] == {'top1': 88.0, 'commit': 'old'}
    assert record['teacher-s0']['params_sha256'] == 'b' and 'first study 88.00' in note
  assert study.is_current(record['kd-s0'], record, 'kd', 0) == same


@pytest.mark.parametrize('marker', ['a', 'z', None])
def test_study_resumes_a_rerun_started_against_the_current_teacher(tmp_path, monkeypatch, marker):
  """A row being redone (its record distils an older teacher) whose rerun was stopped: a folder
  started against the current teacher ('a') is resumed (here it had finished, and only its record
  was missing); a folder started against another teacher, or by an older runner, is kept aside as
  stale and the run starts again."""
  record = {'teacher-s0': {'params_sha256': 'a', 'top1': 88.0, 'commit': 'old'},
            'kd-s0': {'top1': 86.0, 'teacher_sha256': 'x', 'commit': 'old'}}
  write_summary(tmp_path / 'teacher-s0', params_sha256='a')
  student = tmp_path / 'kd-s0'
  write_summary(student, eval={'top1': 86.5}, params_sha256='s')
  calls = []

  def fake_call(cmd):
    calls.append(cmd)
    write_summary(student, eval={'top1': 86.7}, params_sha256='s')
    return 0

  study = offline_study_runner(monkeypatch, fake_call)
  if marker:
    (student / study.STARTED_AGAINST).write_text(marker + '\n')
  study.run(str(tmp_path), 'kd', 0, record)
  assert record['kd-s0']['teacher_sha256'] == 'a'
  assert study.is_current(record['kd-s0'], record, 'kd', 0)
  if marker == 'a':
    assert not calls and record['kd-s0']['top1'] == 86.5
    assert not (tmp_path / 'kd-s0.stale1').exists()
  else:
    assert len(calls) == 1 and record['kd-s0']['top1'] == 86.7
    assert (tmp_path / 'kd-s0.stale1' / 'summary.json').exists()
    assert (student / study.STARTED_AGAINST).read_text() == 'a\n'


def test_study_stops_when_a_student_has_no_teacher_run(tmp_path):
  """A student whose seed's teacher has no finished run in the root (it diverged, say) stops the
  study with one line, before anything of the student's is made."""
  study = study_runner()
  record = {'teacher-s0': {'failed': 'non-finite loss', 'commit': 'x'}}
  with pytest.raises(SystemExit, match='kd-s0 needs teacher-s0, which has no finished run'):
    study.run(str(tmp_path), 'kd', 0, record)
  assert not (tmp_path / 'kd-s0').exists() and 'kd-s0' not in record


def gpu_compare(tmp_path, *args, official='set'):
  """launch/gpu_compare.sh with AFD_OFFICIAL_DIR set to a folder that need not exist
  (`official='set'`), to `official`, or unset (None); OUT unset."""
  env = {k: v for k, v in os.environ.items() if k not in ('AFD_OFFICIAL_DIR', 'OUT')}
  if official is not None:
    env['AFD_OFFICIAL_DIR'] = str(tmp_path / 'afd_official') if official == 'set' else official
  return subprocess.run(['bash', str(runs.REPO / 'launch' / 'gpu_compare.sh'), *args],
                        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)


def flag(line, name):
  words = line.split()
  return words[words.index(name) + 1]


GPU_CASES = [('wrn40x2', 'wrn16x2', '32', '64', 'float32'),
             ('wrn40x2', 'wrn16x2', '32', '1024', 'bfloat16'),
             ('resnet34im', 'resnet18im', '224', '256', 'bfloat16')]


def case_flags(line):
  return tuple(flag(line, f) for f in ('--teacher', '--student', '--image-size', '--batch',
                                       '--dtype'))


def test_gpu_compare_dry_run_prints_both_steps_of_the_three_cases_and_runs_none(tmp_path):
  """Our step and the official one for each case, the official code read from
  AFD_OFFICIAL_DIR, every result appended to OUT.jsonl, then the table into --out; nothing is
  run (no file appears) and no GPU or torch is needed."""
  result = gpu_compare(tmp_path, '--dry-run', '--out', 'tables/cmp.md')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  raw = str(tmp_path / 'tables' / 'cmp.jsonl')
  assert lines[0] == f'cd {runs.REPO}' and 'gpu_compare.py check' in lines[1]
  assert flag(lines[1], '--official-dir') == str(tmp_path / 'afd_official')
  ours = [l for l in lines if '-m afd_jax.bench' in l]
  theirs = [l for l in lines if 'gpu_compare.py official' in l]
  assert [case_flags(l) for l in ours] == GPU_CASES == [case_flags(l) for l in theirs]
  assert all(flag(l, '--official-dir') == str(tmp_path / 'afd_official') for l in theirs)
  assert all('--method all' in l and '--json' in l for l in ours)
  assert [flag(l, '--num-classes') for l in ours] == ['100', '100', '1000']
  assert all(l.endswith(f'>> {raw}') for l in ours + theirs)
  assert lines.index(theirs[0]) > lines.index(ours[0]) and lines.index(ours[1]) > lines.index(
      theirs[0])
  assert lines[-1].split() == [lines[1].split()[0], 'launch/gpu_compare.py', 'table', raw,
                               '--out', str(tmp_path / 'tables' / 'cmp.md')]
  assert list(tmp_path.iterdir()) == []


def test_gpu_compare_dry_run_without_the_official_dir_and_with_grouped_batch_norm(tmp_path):
  """Without AFD_OFFICIAL_DIR the dry run names the variable; --bn-group-size adds our grouped
  WRN steps only; the table goes to $OUT/gpu_compare.md by default."""
  result = gpu_compare(tmp_path, '--dry-run', '--bn-group-size', '32', '--steps', '12',
                       official=None)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  grouped = [l for l in lines if '--bn-group-size 32' in l]
  assert [case_flags(l) for l in grouped] == GPU_CASES[:2]
  assert all('-m afd_jax.bench' in l and flag(l, '--steps') == '12' for l in grouped)
  assert all('--official-dir "$AFD_OFFICIAL_DIR"' in l for l in lines if 'official-dir' in l)
  assert lines[-1].endswith(f'--out {tmp_path}/gpu_compare.md')


@pytest.mark.parametrize('official,args,message', [
    (None, (), 'set AFD_OFFICIAL_DIR'),
    ('not_a_checkout', (), 'is not a checkout of clovaai/attention-feature-distillation'),
    ('set', ('--bn-group-size', '48', '--dry-run'), 'must divide the batches 64 and 1024'),
    ('set', ('--steps',), '--steps needs a value'),
    ('set', ('--rounds', 'x', '--dry-run'), "whole numbers, not 'x'"),
    ('set', ('--steps', '0', '--dry-run'), 'must be at least 1')])
def test_gpu_compare_refuses_in_one_line_before_running_anything(tmp_path, official, args,
                                                                 message):
  if official == 'not_a_checkout':
    (tmp_path / official).mkdir()
    official = str(tmp_path / official)
  result = gpu_compare(tmp_path, *args, official=official)
  assert result.returncode == 2 and result.stdout == ''
  assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def bench_report(batch, ms, **fields):
  """A report of afd_jax.bench --json (the fields the table reads), step ms per method."""
  return {'device': 'GPU x 1', 'backend': 'gpu', 'teacher': 'wrn40x2', 'student': 'wrn16x2',
          'batch': batch, 'dtype': 'float32', 'image_size': 32, 'bn_group_size': 0,
          'results': [{'method': m, 'median_step_ms': t, 'images_per_s': batch / t * 1e3}
                      for m, t in ms.items()], **fields}


def test_gpu_compare_table_puts_ours_beside_the_official_step(tmp_path):
  """Step ms, images/s, afd/kd per row and ours/official images/s per method, on stdout and in
  --out; a case without an official row has no ratio."""
  reports = [bench_report(64, {'ce': 2.0, 'kd': 4.0, 'afd': 5.0}),
             bench_report(64, {'ce': 4.0, 'kd': 8.0, 'afd': 12.0}, implementation='official',
                          official_commit='dd990d0'),
             bench_report(128, {'ce': 3.0, 'kd': 5.0, 'afd': 5.5})]
  raw = tmp_path / 'raw.jsonl'
  raw.write_text(''.join(json.dumps(r) + '\n' for r in reports))
  result = subprocess.run([sys.executable, str(runs.REPO / 'launch' / 'gpu_compare.py'), 'table',
                           str(raw), '--out', str(tmp_path / 'out' / 't.md')],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'out' / 't.md').read_text() == result.stdout
  rows = [l for l in result.stdout.splitlines() if l.startswith('| wrn40x2')]
  cells = [[c.strip() for c in r.strip('|').split('|')] for r in rows]
  assert [c[3:5] for c in cells] == [['float32', 'afd_jax'], ['float32', 'official'],
                                     ['float32', 'afd_jax']]
  assert cells[0][5:] == ['2.00', '4.00', '5.00', '32,000', '16,000', '12,800', '**1.250**',
                          '2.00 / 2.00 / 2.40']
  assert cells[1][10:] == ['5,333', '**1.500**', '-'] and cells[2][2] == '128'
  assert cells[2][-2:] == ['**1.100**', '-'] and 'dd990d0' in result.stdout


OFFICIAL_DIR = os.environ.get('AFD_OFFICIAL_DIR')


@pytest.mark.skipif(not OFFICIAL_DIR or importlib.util.find_spec('torch') is None,
                    reason='needs torch and AFD_OFFICIAL_DIR, a checkout of the official AFD code')
def test_gpu_compare_times_the_official_step_on_the_cpu():
  """The official ce, kd and afd steps run (here on the CPU, tiny): from the same student,
  teacher and batch the first losses grow by the KD and then the AFD term."""
  result = subprocess.run(
      [sys.executable, str(runs.REPO / 'launch' / 'gpu_compare.py'), 'official', '--device',
       'cpu', '--official-dir', OFFICIAL_DIR, '--teacher', 'resnet20', '--student', 'resnet20',
       '--batch', '2', '--image-size', '16', '--num-classes', '10', '--steps', '2', '--rounds',
       '2', '--warmup', '1'], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report['implementation'] == 'official' and report['batch'] == 2
  by = {r['method']: r for r in report['results']}
  assert list(by) == ['ce', 'kd', 'afd'] and all(r['steps_timed'] == 2 for r in by.values())
  assert 0 < by['ce']['first_loss'] < by['kd']['first_loss'] < by['afd']['first_loss']
  assert report['afd_over_kd'] == by['afd']['median_step_ms'] / by['kd']['median_step_ms']

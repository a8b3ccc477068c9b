"""Launch scripts: the TPU pod dry run prints the commands; bad use is refused."""
import subprocess

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

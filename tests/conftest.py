"""Test set-up: 8 fake CPU devices, set before JAX starts; shared fixtures."""
import os
import tempfile

# XLA's CPU compiles dominate the suite's time; LLVM at -O0 halves them, and XLA's older
# (non-MLIR) fusion emitters halve them again (a tiny AFD run's compiles: 21 s -> 10.5 s on
# 8 devices, same parameters bit for bit). The programs compute the same operations (tolerances
# are unchanged); only the machine code differs. AFD_TEST_XLA_OPT=1 restores XLA's defaults to
# check the suite under them.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8' +
                           ('' if os.environ.get('AFD_TEST_XLA_OPT') == '1'
                            else ' --xla_backend_optimization_level=0'
                                 ' --xla_cpu_use_fusion_emitters=false')).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# XLA's CPU compiles dominate the suite's time; a persistent compilation cache, fresh for each
# session and inherited by the subprocesses that tests start, compiles each program once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='afd_jax_xla_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the offline `digits` dataset, built once per session."""
  from afd_jax import data  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('tfds_digits'))
  config = digits.get_config('teacher')
  config.dataset.data_dir = path
  data.dataset_info(config)
  return path

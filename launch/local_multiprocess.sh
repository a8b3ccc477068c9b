#!/usr/bin/env bash
# The multi-host path on one machine: N CPU processes over a loopback coordinator.
#
#   launch/local_multiprocess.sh N COMMAND...
#   launch/local_multiprocess.sh 2 .venv/bin/python -m afd_jax.main \
#       --config=configs/digits.py:afd --workdir=/tmp/mp --config.teacher.checkpoint=random
#
# Each process gets AFD_COORDINATOR_ADDRESS=127.0.0.1:PORT (bound to 127.0.0.1 only),
# AFD_NUM_PROCESSES=N, AFD_PROCESS_ID=i, gloo CPU collectives and DEVICES_PER_PROCESS fake CPU
# devices (default 4); afd_jax calls jax.distributed.initialize from these. Output lines are
# prefixed with [pI]. Exits non-zero if any process fails. PORT: $AFD_PORT or a free one.
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,13p' "$0"; exit 2
fi
n=$1; shift
port=${AFD_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  (
    export AFD_COORDINATOR_ADDRESS="127.0.0.1:$port" AFD_COORDINATOR_BIND_ADDRESS="127.0.0.1:$port"
    export AFD_NUM_PROCESSES="$n" AFD_PROCESS_ID="$i" AFD_CPU_COLLECTIVES=gloo JAX_PLATFORMS=cpu
    flags=$(echo "${XLA_FLAGS:-}" | sed "s/--xla_force_host_platform_device_count=[0-9]*//g")
    export XLA_FLAGS="$flags --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
    "$@" 2>&1 | sed -u "s/^/[p$i] /"
  ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit $status

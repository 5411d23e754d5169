#!/usr/bin/env bash
# What the test suite needs from the machine, beyond pip: Debian's Chromium for the demo's browser
# test (Playwright drives /usr/bin/chromium; its own browser download is not used) and a local
# two-node SLURM cluster for tests/slurm. Idempotent; as root, or with sudo.
set -euo pipefail
SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo")
if [ ! -x /usr/bin/chromium ]; then
  $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
# A two-node SLURM cluster on this machine for tests/slurm (idempotent; if it cannot start, those
# tests skip with the reason instead of failing the run).
$SUDO bash scripts/slurm/local_cluster.sh start \
  || echo "test_machine: local SLURM cluster not started; tests/slurm will be skipped"

#!/usr/bin/env bash
# Run edge-llm in an emulated Debian Bookworm arm64 userland (the Pi 5's OS base and CPU
# core, under qemu-user): install this checkout, generate with the default model, and run
# the tests that need neither torch nor transformers. Correctness only: emulation is
# 20-50x slower than a Pi. Not part of CI (it takes ~15-30 minutes the first time).
#
# The rootfs (qemu-user-static + debootstrap from Debian's packages, Python 3.11 venv) is
# built by the team's shared tool next to this checkout: ../shared/tools/arm64/.
# Usage: sudo tests/arm64/check.sh        (root: debootstrap, binfmt, chroot)
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
tools=${ARM_TOOLS:-$here/../shared/tools/arm64}
[ -x "$tools/make_arm_rootfs.sh" ] || [ -f "$tools/make_arm_rootfs.sh" ] || {
    echo "check.sh: no $tools/make_arm_rootfs.sh (set ARM_TOOLS)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "check.sh: run as root" >&2; exit 1; }

start=$(date +%s)
bash "$tools/make_arm_rootfs.sh"

# A copy of the checkout: the emulated pip must not write build files into the real one.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$here" archive HEAD | tar -x -C "$work"

bash "$tools/run_in_arm.sh" -p "$work" -e EDGE_LLM_HOME=/tmp/edge-llm-home -- bash -euc '
    uname -m
    python -m pip install -q . pytest
    edge-llm run "What is the capital of France?" --temperature 0 -n 24 -v
    python -m pytest -q -p no:cacheprovider tests/test_tflite_graph.py tests/test_sampler.py \
        tests/test_stop_strings.py tests/test_sd_notify.py
'
echo "arm64 check passed in $(( $(date +%s) - start )) s"

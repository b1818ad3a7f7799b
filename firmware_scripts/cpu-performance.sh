#!/usr/bin/env bash
# Optional: run the CPUs at full clock (the "performance" cpufreq governor) for edge-llm.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $PROG [--revert] [--root DIR] [--dry-run]

Set the cpufreq governor of every CPU to "performance": now (sysfs) and at every boot
(a small oneshot unit, $UNIT_NAME, enabled in multi-user.target).
Token generation starts without waiting for the "ondemand" governor to ramp up; the
price is power and heat (use a cooler on a Pi 5: it throttles at 85 C either way).

  --revert     Put back the governor found on the first run (the unit records it),
               disable and remove the unit.
  --root DIR   Act on the tree at DIR: DIR/sys/... if present, DIR/etc/systemd/system;
               no systemctl. Without it the script refuses to run on a non-Pi host.
  --dry-run    Print what would change; write nothing.
  -h, --help   This text.

Re-running changes nothing.
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

UNIT_NAME=edge-llm-cpu-performance.service

# The governor files: one per cpufreq policy (the Pi 5 has one policy for its 4 cores).
governor_files() {
    local f found=0
    for f in "$ROOT"/sys/devices/system/cpu/cpufreq/policy*/scaling_governor; do
        [[ -e $f ]] && { printf '%s\n' "$f"; found=1; }
    done
    (( found )) && return 0
    for f in "$ROOT"/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor; do
        [[ -e $f ]] && printf '%s\n' "$f"
    done
    return 0
}

set_governor() {   # set_governor NAME: write NAME to every governor file that differs
    local f want=$1 have
    while IFS= read -r f; do
        have="$(cat "$f")"
        [[ $have == "$want" ]] && continue
        if (( DRY_RUN )); then printf 'echo %s > %s   # now: %s\n' "$want" "$(rel "$f")" "$have"; continue; fi
        printf '%s\n' "$want" > "$f"
        note "governor:  $(rel "$f"): $have -> $want"
    done < <(governor_files)
}

render_unit() {   # render_unit PREVIOUS_GOVERNOR
    local files='/sys/devices/system/cpu/cpufreq/policy*/scaling_governor'
    cat <<EOF
# Installed by edge-llm's firmware_scripts/cpu-performance.sh; removed by its --revert.
[Unit]
Description=CPU governor "performance" for edge-llm
# raspi-config's boot script sets "ondemand"; run after it.
After=raspi-config.service
Before=edge-llm.service
ConditionPathExists=/sys/devices/system/cpu/cpufreq

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=PREVIOUS_GOVERNOR=$1
ExecStart=/bin/sh -c 'for f in $files; do echo performance > "\$\$f"; done'
ExecStop=/bin/sh -c 'for f in $files; do echo "\$\$PREVIOUS_GOVERNOR" > "\$\$f"; done'

[Install]
WantedBy=multi-user.target
EOF
}

REVERT=0
while (( $# )); do
    case $1 in
    --revert) REVERT=1 ;;
    --root) set_root "${2:-}"; shift ;;
    --root=*) set_root "${1#--root=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
    esac
    shift
done
require_target

UNIT="$ROOT/etc/systemd/system/$UNIT_NAME"
WANTS="$ROOT/etc/systemd/system/multi-user.target.wants/$UNIT_NAME"

# The governor to go back to: the one recorded in our unit, else the current one.
previous=""
if [[ -f $UNIT ]]; then
    grep -q "cpu-performance.sh" "$UNIT" || die "$(rel "$UNIT") exists and is not ours; not touching it"
    previous="$(sed -n 's/^Environment=PREVIOUS_GOVERNOR=//p' "$UNIT")"
fi
if [[ -z $previous ]]; then
    first="$(governor_files | head -n1)"
    [[ -n $first ]] && previous="$(cat "$first")"
    [[ -n $previous ]] || previous=ondemand   # Raspberry Pi OS's default
fi

if (( REVERT )); then
    if live && [[ -f $UNIT ]]; then
        if (( DRY_RUN )); then printf 'systemctl disable --now %s\n' "$UNIT_NAME"
        else systemctl disable --now "$UNIT_NAME"; fi
    fi
    [[ -f $UNIT ]] && set_governor "$previous"
    remove_file "$WANTS"
    remove_file "$UNIT"
    if live && (( !DRY_RUN )); then systemctl daemon-reload; fi
    exit 0
fi

if [[ -n $(governor_files) ]]; then
    first="$(governor_files | head -n1)"
    avail="$(dirname "$first")/scaling_available_governors"
    if [[ -f $avail ]] && ! grep -qw performance "$avail"; then
        die "the kernel offers no \"performance\" governor ($(cat "$avail"))"
    fi
    set_governor performance
else
    note "no cpufreq in $(rel "$ROOT/sys")/devices/system/cpu: only the boot-time unit is installed"
fi
render_unit "$previous" > "$WORK/unit"
install_file "$UNIT" "$WORK/unit" 0644
if live; then
    if (( DRY_RUN )); then
        [[ -L $WANTS ]] || printf 'systemctl enable %s\n' "$UNIT_NAME"
    else
        systemctl daemon-reload
        systemctl enable "$UNIT_NAME"
    fi
else
    make_symlink "$WANTS" "/etc/systemd/system/$UNIT_NAME"
fi

#!/usr/bin/env bash
# Give edge-llm a serial port on a Raspberry Pi: the GPIO UART or a USB gadget serial port.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $PROG --uart | --usb-gadget [--root DIR] [--dry-run]
       $PROG --revert [--root DIR] [--dry-run] [--force]

Free a serial port for edge-llm's serial console (then set
EDGE_LLM_SERVE_ARGS="--serial DEVICE" in /etc/edge-llm/edge-llm.env and reboot).

  --uart        GPIO 14/15 UART: enable_uart=1 and dtparam=uart0=on under [all] in
                config.txt; drop console=serial0/ttyAMA0/ttyS0 from cmdline.txt; on the
                live system also disable serial-getty@ttyAMA0 and @serial0.
                Device: /dev/ttyAMA0 on a Pi 5, /dev/serial0 on a Pi 4 or older.
  --usb-gadget  USB serial over the USB-C port: dtoverlay=dwc2,dr_mode=peripheral under
                [all] in config.txt and modules-load=dwc2,g_serial after rootwait in
                cmdline.txt (the port then no longer works as a USB host). g_serial
                gives /dev/ttyGS0 (the host sees /dev/ttyACM0 or a COM port).
  --revert      Put back config.txt and cmdline.txt as they were before the first edit
                (from *.edge-llm.bak) and re-enable the gettys that were disabled.
                Refuses if the files were changed since, unless --force.
  --root DIR    Act on the tree at DIR (a mounted image, a test tree): files only, no
                systemctl. Without it the script refuses to run on a non-Pi host.
  --dry-run     Print a unified diff of what would change; write nothing.
  -h, --help    This text.

cmdline.txt stays a single line. Re-running changes nothing.
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# config.txt: what each mode needs in an unfiltered ([all]) section.
#   "key=value" for last-one-wins settings; "dtparam:name=value" for a dtparam.
declare -A CONFIG_WANT=(
    [uart]="enable_uart=1 dtparam:uart0=on"
    [usb]=""
)
declare -A CONFIG_NOTE=(
    [uart]="edge-llm: serial console on the GPIO 14/15 UART (enable-serial.sh --uart)"
    [usb]="edge-llm: USB gadget serial on the USB-C port (enable-serial.sh --usb-gadget)"
)
declare -A GETTYS=(
    [uart]="serial-getty@ttyAMA0.service serial-getty@serial0.service"
    [usb]="serial-getty@ttyGS0.service"
)

# config_edit MODE IN OUT: OUT = IN plus whatever MODE still lacks, appended under [all].
config_edit() {
    local mode=$1 in=$2 out=$3 dwc2=0
    [[ $mode == usb ]] && dwc2=1
    cp "$in" "$out"
    awk -v want="${CONFIG_WANT[$mode]}" -v dwc2="$dwc2" -v comment="${CONFIG_NOTE[$mode]}" '
        function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t\r]+$/, "", s); return s }
        function record(k, v) { last[k] = v; lastok[k] = unfiltered }
        BEGIN { unfiltered = 1; n = split(want, W, " ") }
        { blank = ($0 ~ /^[ \t\r]*$/) }
        {
            line = trim($0)
            if (line == "" || line ~ /^#/) next
            if (line ~ /^\[.*\]$/) { unfiltered = (tolower(line) == "[all]"); next }
            if (line ~ /^dtparams?=/) {
                m = split(substr(line, index(line, "=") + 1), P, ",")
                for (i = 1; i <= m; i++) {
                    if (P[i] == "") continue
                    eq = index(P[i], "=")
                    if (eq) record("dtparam:" substr(P[i], 1, eq - 1), substr(P[i], eq + 1))
                    else record("dtparam:" P[i], "on")
                }
                next
            }
            if (line ~ /^dtoverlay=dwc2(,|$)/) { dwc2ok = unfiltered && line !~ /dr_mode=host/; next }
            eq = index(line, "=")
            if (eq) record(trim(substr(line, 1, eq - 1)), trim(substr(line, eq + 1)))
        }
        END {
            missing = ""
            for (i = 1; i <= n; i++) {
                eq = index(W[i], "="); k = substr(W[i], 1, eq - 1); v = substr(W[i], eq + 1)
                if ((k in last) && last[k] == v && lastok[k]) continue
                if (k ~ /^dtparam:/) missing = missing "dtparam=" substr(k, 9) "=" v "\n"
                else missing = missing k "=" v "\n"
            }
            if (dwc2 && !dwc2ok) missing = missing "dtoverlay=dwc2,dr_mode=peripheral\n"
            if (missing == "") exit
            if (!unfiltered) printf "%s[all]\n", (NR && !blank ? "\n" : "")
            printf "# %s\n%s", comment, missing
        }' "$in" > "$WORK/config.block"
    if [[ -s $WORK/config.block ]]; then
        # the block starts on a line of its own
        if [[ -s $in && $(tail -c1 "$in" | od -An -c | tr -d ' ') != '\n' ]]; then
            printf '\n' >> "$out"
        fi
        cat "$WORK/config.block" >> "$out"
    fi
}

# cmdline_edit MODE IN OUT: edit the kernel command line (the first and only line).
cmdline_edit() {
    local mode=$1 in=$2 out=$3 line tok changed=0 found=0 v
    local -a toks=() new=()
    if [[ $(grep -c '[^[:space:]]' "$in" || true) -gt 1 ]]; then
        die "$(rel "$in") has more than one line; the firmware reads only the first. Fix it by hand."
    fi
    IFS= read -r line < "$in" || true
    read -ra toks <<< "$line"
    case $mode in
    uart)
        for tok in "${toks[@]}"; do
            if [[ $tok =~ ^console=(serial0|ttyAMA0|ttyS0)(,.*)?$ ]]; then changed=1; continue; fi
            new+=("$tok")
        done
        ;;
    usb)
        for tok in "${toks[@]}"; do
            if [[ $tok == modules-load=* ]]; then
                found=1
                v="${tok#modules-load=}"
                [[ ,$v, == *,dwc2,* ]] || { v="${v:+$v,}dwc2"; changed=1; }
                [[ ,$v, == *,g_serial,* ]] || { v="$v,g_serial"; changed=1; }
                if [[ ,$v, =~ ,(g_ether|g_multi|g_cdc|g_mass_storage|g_hid|g_zero), ]]; then
                    note "warning: modules-load also has ${BASH_REMATCH[1]}; only one legacy gadget can own the port"
                fi
                tok="modules-load=$v"
            fi
            new+=("$tok")
        done
        if (( !found )); then
            changed=1
            new=()
            for tok in "${toks[@]}"; do
                new+=("$tok")
                if [[ $tok == rootwait && $found == 0 ]]; then new+=("modules-load=dwc2,g_serial"); found=1; fi
            done
            (( found )) || new+=("modules-load=dwc2,g_serial")
        fi
        ;;
    esac
    if (( !changed )); then cp "$in" "$out"; return 0; fi
    local IFS=' '
    printf '%s' "${new[*]}" > "$out"
    if [[ $(wc -l < "$in") -ge 1 ]]; then   # keep the newline and anything after the line
        printf '\n' >> "$out"
        tail -n +2 "$in" >> "$out"
    fi
}

GETTY_STATE=/var/backups/edge-llm-disabled-gettys   # live system only

disable_gettys() {
    local u state
    live || return 0
    for u in "$@"; do
        state="$(systemctl is-enabled "$u" 2>/dev/null || true)"
        if ! systemctl is-active --quiet "$u" && [[ $state != enabled ]]; then continue; fi
        if (( DRY_RUN )); then printf 'systemctl disable --now %s\n' "$u"; continue; fi
        if [[ $state == enabled ]] && ! grep -qxF "$u" "$GETTY_STATE" 2>/dev/null; then
            mkdir -p "$(dirname "$GETTY_STATE")"
            printf '%s\n' "$u" >> "$GETTY_STATE"
        fi
        systemctl disable --now "$u"
        note "disabled:  $u"
    done
}

restore_gettys() {
    local u
    live && [[ -f $GETTY_STATE ]] || return 0
    while IFS= read -r u; do
        [[ -n $u ]] || continue
        if (( DRY_RUN )); then printf 'systemctl enable %s\n' "$u"; continue; fi
        systemctl enable "$u"
        note "re-enabled: $u"
    done < "$GETTY_STATE"
    (( DRY_RUN )) || rm -f "$GETTY_STATE"
}

# True if CURRENT is what edge-llm's edits (any modes, any order) make of ORIGINAL.
produced_by_us() {
    local kind=$1 orig=$2 current=$3 seq m prev
    for seq in "uart" "usb" "uart usb" "usb uart"; do
        prev="$orig"
        for m in $seq; do
            "${kind}_edit" "$m" "$prev" "$WORK/$kind.$m.chk"
            prev="$WORK/$kind.$m.chk"
        done
        cmp -s "$prev" "$current" && return 0
    done
    return 1
}

MODE="" REVERT=0 FORCE=0
while (( $# )); do
    case $1 in
    --uart) MODE=uart ;;
    --usb-gadget) MODE=usb ;;
    --revert) REVERT=1 ;;
    --force) FORCE=1 ;;
    --root) set_root "${2:-}"; shift ;;
    --root=*) set_root "${1#--root=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
    esac
    shift
done
[[ -n $MODE ]] || (( REVERT )) || usage_error "choose --uart or --usb-gadget (or --revert)"
require_target

BOOT="$(boot_dir)"
CONFIG="$BOOT/config.txt"
CMDLINE="$BOOT/cmdline.txt"
[[ -f $CMDLINE ]] || die "no cmdline.txt beside $(rel "$CONFIG")"

if (( REVERT )); then
    for kind in config cmdline; do
        f="$CONFIG"; [[ $kind == cmdline ]] && f="$CMDLINE"
        if [[ -e $f$BAK ]] && ! cmp -s "$f" "$f$BAK" && ! produced_by_us "$kind" "$f$BAK" "$f"; then
            (( FORCE )) || die "$(rel "$f") was changed after edge-llm edited it; not reverting" \
                "(compare it with $(rel "$f$BAK"), or pass --force to restore the backup anyway)"
        fi
    done
    restore_backup "$CONFIG"
    restore_backup "$CMDLINE"
    restore_gettys
    (( DRY_RUN )) || note "done; reboot for the change to take effect"
    exit 0
fi

config_edit "$MODE" "$CONFIG" "$WORK/config.txt"
cmdline_edit "$MODE" "$CMDLINE" "$WORK/cmdline.txt"
apply_file "$CONFIG" "$WORK/config.txt"
apply_file "$CMDLINE" "$WORK/cmdline.txt"
read -ra units <<< "${GETTYS[$MODE]}"
disable_gettys "${units[@]}"
if (( !DRY_RUN )); then
    case $MODE in
    uart) note "done; reboot, then use --serial /dev/ttyAMA0 (Pi 5) or /dev/serial0 (Pi 4 and older)" ;;
    usb) note "done; reboot, then use --serial /dev/ttyGS0 (g_serial)" ;;
    esac
fi

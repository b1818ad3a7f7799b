# shellcheck shell=bash
# Helpers shared by edge-llm's firmware scripts; sourced, never run.
#
# Every change goes through apply_file/remove_file/restore_backup, which:
#   - do nothing when the file already has the wanted content (idempotent);
#   - with --dry-run print a unified diff (labels a/PATH b/PATH relative to the root,
#     so "patch -p1 -d ROOT" applies it) and write nothing;
#   - before the first edit of an existing file keep FILE.edge-llm.bak, the original
#     byte for byte, which the scripts' --revert/--uninstall put back.

ROOT=""            # --root DIR; "" means the live system
DRY_RUN=0
ALLOW_NON_PI=0     # install.sh --force
BAK=".edge-llm.bak"
PROG="${0##*/}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

die()   { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: %s (see --help)\n' "$PROG" "$*" >&2; exit 2; }
note()  { printf '%s: %s\n' "$PROG" "$*" >&2; }
live()  { [[ -z $ROOT ]]; }

# --root DIR: normalise to an absolute path without a trailing slash.
set_root() {
    [[ -n ${1:-} ]] || usage_error "--root needs a directory"
    [[ -d $1 ]] || die "--root $1: no such directory"
    ROOT="$(cd "$1" && pwd)"
    [[ $ROOT != / ]] || ROOT=""
}

# A Raspberry Pi, or at least a Pi OS boot layout. EDGE_LLM_PROBE_ROOT moves the probe
# (tests use it so that they behave the same on any host).
looks_like_pi() {
    local probe="${EDGE_LLM_PROBE_ROOT:-}"
    if [[ -r $probe/proc/device-tree/model ]] &&
        tr -d '\0' < "$probe/proc/device-tree/model" | grep -q 'Raspberry Pi'; then
        return 0
    fi
    [[ -f $probe/boot/firmware/config.txt ]]
}

# Refuse to touch a live system that is not a Pi, and a live system without root.
require_target() {
    live || return 0
    (( ALLOW_NON_PI )) || looks_like_pi || die "this does not look like a Raspberry Pi (no \"Raspberry Pi\" in" \
        "/proc/device-tree/model and no /boot/firmware/config.txt); nothing was changed." \
        "To prepare an SD card image or a test tree, pass --root DIR."
    (( DRY_RUN )) || [[ $EUID -eq 0 ]] || die "must run as root (sudo $0 ...)"
}

# The firmware partition: /boot/firmware on Bookworm, /boot on older releases.
boot_dir() {
    local d
    for d in "$ROOT/boot/firmware" "$ROOT/boot"; do
        [[ -f $d/config.txt ]] && { printf '%s\n' "$d"; return 0; }
    done
    die "no config.txt in $ROOT/boot/firmware or $ROOT/boot"
}

# run CMD...: run it, or with --dry-run print it.
run() {
    if (( DRY_RUN )); then printf '+'; printf ' %q' "$@"; printf '\n'; return 0; fi
    "$@"
}

rel() { printf '/%s\n' "${1#"$ROOT"/}"; }

show_diff() {   # show_diff OLD NEW LABEL  (OLD or NEW may be /dev/null)
    diff -u --label "a$3" --label "b$3" "$1" "$2" || [[ $? -eq 1 ]]
}

# Replace TARGET's content with NEW's, keeping mode and owner (or MODE for a new file).
# Written beside the target, synced and renamed, so a power cut leaves old or new.
write_atomic() {
    local target=$1 new=$2 mode=${3:-0644} tmp
    mkdir -p "$(dirname "$target")"
    tmp="$(mktemp "$(dirname "$target")/.${target##*/}.XXXXXX")"
    cat "$new" > "$tmp"
    if [[ -e $target ]]; then
        chmod --reference="$target" "$tmp"
        chown --reference="$target" "$tmp" 2>/dev/null || true   # vfat cannot chown
    else
        chmod "$mode" "$tmp"
    fi
    sync "$tmp" 2>/dev/null || true
    mv -f "$tmp" "$target"
}

# apply_file TARGET NEW [MODE]: make TARGET hold NEW's bytes. An existing file is
# backed up first (once: the backup always holds the state before edge-llm's first edit).
apply_file() {
    local target=$1 new=$2 mode=${3:-0644} label
    label="$(rel "$target")"
    if [[ -f $target ]] && cmp -s "$target" "$new"; then
        note "unchanged: $label"
        return 0
    fi
    if (( DRY_RUN )); then
        if [[ -f $target ]]; then show_diff "$target" "$new" "$label"
        else show_diff /dev/null "$new" "$label"; fi
        return 0
    fi
    if [[ -f $target && ! -e $target$BAK ]]; then
        cp --preserve=mode,timestamps "$target" "$target$BAK"
        note "backup:    $label$BAK"
    fi
    if [[ -f $target ]]; then note "edited:    $label"; else note "created:   $label"; fi
    write_atomic "$target" "$new" "$mode"
}

# install_file TARGET NEW [MODE]: like apply_file, for a file edge-llm owns outright
# (a unit, a sysusers.d entry): no backup, and the mode is always MODE.
install_file() {
    local target=$1 new=$2 mode=${3:-0644} label
    label="$(rel "$target")"
    if [[ -f $target ]] && cmp -s "$target" "$new" &&
        [[ $(stat -c %a "$target") == "${mode#0}" ]]; then
        note "unchanged: $label"
        return 0
    fi
    if (( DRY_RUN )); then
        if [[ -f $target ]]; then show_diff "$target" "$new" "$label"
        else show_diff /dev/null "$new" "$label"; fi
        return 0
    fi
    if [[ -f $target ]]; then note "updated:   $label"; else note "created:   $label"; fi
    rm -f "$target"
    write_atomic "$target" "$new" "$mode"
}

# remove_file TARGET: delete a file (or symlink) edge-llm created.
remove_file() {
    local target=$1
    [[ -e $target || -L $target ]] || return 0
    if (( DRY_RUN )); then
        if [[ -f $target && ! -L $target ]]; then show_diff "$target" /dev/null "$(rel "$target")"
        else printf 'remove %s\n' "$(rel "$target")"; fi
        return 0
    fi
    rm -f "$target"
    note "removed:   $(rel "$target")"
}

# restore_backup TARGET: put TARGET.edge-llm.bak back in place (byte for byte).
restore_backup() {
    local target=$1 label
    label="$(rel "$target")"
    if [[ ! -e $target$BAK ]]; then
        note "no backup: $label$BAK (nothing to revert)"
        return 0
    fi
    if (( DRY_RUN )); then
        if [[ -f $target ]]; then show_diff "$target" "$target$BAK" "$label"
        else show_diff /dev/null "$target$BAK" "$label"; fi
        return 0
    fi
    mv -f "$target$BAK" "$target"
    note "restored:  $label"
}

# make_symlink LINK DEST: what "systemctl enable" does, for a tree under --root.
make_symlink() {
    local link=$1 dest=$2
    [[ -L $link && $(readlink "$link") == "$dest" ]] && return 0
    if (( DRY_RUN )); then printf 'symlink %s -> %s\n' "$(rel "$link")" "$dest"; return 0; fi
    mkdir -p "$(dirname "$link")"
    ln -sfn "$dest" "$link"
    note "symlink:   $(rel "$link") -> $dest"
}

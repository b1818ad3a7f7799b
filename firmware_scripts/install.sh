#!/usr/bin/env bash
# Install (or remove) edge-llm as a hardened systemd service on a Raspberry Pi.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $PROG [--from DIR_OR_WHEEL] [--model PATH] [--skip-model] [--root DIR] [--dry-run] [--force]
       $PROG --uninstall [--purge] [--root DIR] [--dry-run]

Install:
  1. system user "edge-llm" (member of dialout) via /etc/sysusers.d/edge-llm.conf
  2. venv $VENV, "pip install" of this checkout (or --from DIR_OR_WHEEL)
  3. /etc/edge-llm/edge-llm.env from the example, only if absent (never overwritten)
  4. /etc/systemd/system/edge-llm.service
  5. the model converted/fetched once into /var/cache/edge-llm by "edge-llm prepare",
     run as edge-llm inside the service's sandbox (skip with --skip-model)
  6. systemctl daemon-reload, enable, (re)start; waits until the model is loaded
Re-running upgrades the package and the unit and keeps the operator's settings.

  --from X      Package to install: a source checkout or a .whl (default: this checkout).
  --model PATH  Checkpoint or bundle to serve. A path the service cannot see (/home,
                /root, /tmp, or unreadable by edge-llm) is copied to /var/lib/edge-llm/models.
                Written to EDGE_LLM_MODEL only in a newly created env file.
  --skip-model  Do not run "edge-llm prepare" (the service converts on first start).
  --uninstall   Stop, disable and remove the unit, the venv and the user; keep
                /etc/edge-llm, /var/lib/edge-llm and /var/cache/edge-llm ...
  --purge       ... unless --purge is given too.
  --root DIR    Only lay down (or remove) the files under DIR: the unit, the sysusers.d
                entry, the env file. No useradd, pip or systemctl; nothing is enabled.
  --dry-run     Print the diffs and the commands; change nothing.
  --force       Install on a live system that is not a Raspberry Pi.
  -h, --help    This text.
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(dirname "$HERE")"
VENV=/opt/edge-llm/venv
SERVICE=edge-llm.service
USER_NAME=edge-llm
STATE_DIR=/var/lib/edge-llm
CACHE_DIR=/var/cache/edge-llm
PREPARE=(prepare)            # "edge-llm prepare [--model PATH]": convert/fetch, warm up, exit

UNIT="$ROOT/etc/systemd/system/$SERVICE"   # recomputed after --root (see paths)
paths() {
    UNIT="$ROOT/etc/systemd/system/$SERVICE"
    SYSUSERS="$ROOT/etc/sysusers.d/edge-llm.conf"
    ENV_FILE="$ROOT/etc/edge-llm/edge-llm.env"
}

render_sysusers() {
    cat <<EOF
# edge-llm service account; installed by edge-llm's firmware_scripts/install.sh.
u $USER_NAME - "edge-llm LLM service" $STATE_DIR /usr/sbin/nologin
m $USER_NAME dialout
EOF
}

render_env() {   # the example, with EDGE_LLM_MODEL set to $1 if given
    MODEL="$1" awk 'ENVIRON["MODEL"] != "" && /^EDGE_LLM_MODEL=/ { print "EDGE_LLM_MODEL=" ENVIRON["MODEL"]; next }
                    { print }' "$CHECKOUT/systemd/edge-llm.env.example"
}

# A --model path the sandboxed service cannot see is copied into the state directory.
stage_model() {
    local src=$1 dest
    src="$(realpath -e "$src")" || die "--model $1: not found"
    case $src in
    /home/*|/root/*|/tmp/*|/var/tmp/*|/run/user/*) ;;
    *) if runuser -u "$USER_NAME" -- test -r "$src"; then printf '%s\n' "$src"; return 0; fi ;;
    esac
    dest="$STATE_DIR/models/$(basename "$src")"
    if [[ -e $dest ]]; then
        note "using $dest, copied there before (remove it to copy $src again)"
    else
        note "copying $src to $dest (the service cannot read it where it is)"
        {
            run install -d -o "$USER_NAME" -g "$USER_NAME" -m 0750 "$STATE_DIR" "$STATE_DIR/models"
            run cp -a --no-preserve=ownership "$src" "$dest"
            run chown -R "$USER_NAME:$USER_NAME" "$dest"
        } >&2
    fi
    printf '%s\n' "$dest"
}

do_install() {
    local model="" have_user=0
    if live; then
        command -v systemctl > /dev/null || die "systemd is required"
        python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2> /dev/null ||
            die "need Python >= 3.11 with venv: sudo apt install python3-venv"
        FROM="$(realpath -e "$FROM")" || die "--from: no such file or directory"
        if [[ -f $FROM ]]; then [[ $FROM == *.whl ]] || die "--from $FROM: not a wheel"
        elif [[ ! -f $FROM/pyproject.toml ]]; then die "--from $FROM: no pyproject.toml there"; fi
    fi

    # 1. user
    render_sysusers > "$WORK/sysusers"
    install_file "$SYSUSERS" "$WORK/sysusers" 0644
    if live; then
        run systemd-sysusers "$SYSUSERS"
        getent passwd "$USER_NAME" > /dev/null && have_user=1
    fi

    # 2. venv + package
    if live; then
        [[ -x $VENV/bin/python ]] || run python3 -m venv "$VENV"
        run "$VENV/bin/pip" install --upgrade --disable-pip-version-check "$FROM"
    fi

    # 3. settings: created once, then the operator's
    if [[ -n $MODEL_ARG ]]; then
        if live && (( have_user )); then model="$(stage_model "$MODEL_ARG")"; else model="$MODEL_ARG"; fi
    fi
    if [[ -e $ENV_FILE ]]; then
        note "kept:      $(rel "$ENV_FILE") (yours; compare with systemd/edge-llm.env.example)"
        if [[ -n $model ]] && ! grep -qxF "EDGE_LLM_MODEL=$model" "$ENV_FILE"; then
            note "warning: set EDGE_LLM_MODEL=$model in $(rel "$ENV_FILE") to serve that model"
        fi
    else
        render_env "$model" > "$WORK/env"
        install_file "$ENV_FILE" "$WORK/env" 0600
    fi

    # 4. unit
    install_file "$UNIT" "$CHECKOUT/systemd/$SERVICE" 0644
    if ! live; then
        note "done: files laid down under $ROOT; run $PROG on the Pi to build the venv and start it"
        return 0
    fi

    # 5. model, once, as the service user in the service's sandbox
    if (( !SKIP_MODEL )); then
        local -a args=("${PREPARE[@]}")
        [[ -n $model ]] && args+=(--model "$model")
        note "preparing the model as $USER_NAME (this can take a while the first time)"
        run systemd-run --quiet --wait --pipe --collect --service-type=exec \
            -p User="$USER_NAME" -p Group="$USER_NAME" -p SupplementaryGroups=dialout \
            -p StateDirectory=edge-llm -p CacheDirectory=edge-llm -p WorkingDirectory="$STATE_DIR" \
            -p ProtectSystem=strict -p ProtectHome=yes -p PrivateTmp=yes -p NoNewPrivileges=yes \
            -p Environment=EDGE_LLM_HOME="$CACHE_DIR" -p EnvironmentFile=-/etc/edge-llm/edge-llm.env \
            "$VENV/bin/edge-llm" "${args[@]}" ||
            die "\"edge-llm ${args[*]}\" failed (see above); fix it or rerun with --skip-model"
    fi

    # 6. start; "restart" of a Type=notify unit returns once READY=1 arrives
    run systemctl daemon-reload
    run systemctl enable "$SERVICE"
    run systemctl restart "$SERVICE" ||
        die "$SERVICE did not start; see: journalctl -u edge-llm -b"
    (( DRY_RUN )) || note "done: $SERVICE is running (systemctl status edge-llm; journalctl -u edge-llm)"
}

remove_tree() {   # remove_tree DIR: rm -rf, printed under --dry-run
    [[ -e $1 ]] || return 0
    if (( DRY_RUN )); then printf 'remove %s/\n' "$(rel "$1")"; return 0; fi
    rm -rf "$1"
    note "removed:   $(rel "$1")/"
}

do_uninstall() {
    if live; then
        if [[ -f $UNIT ]] || systemctl cat "$SERVICE" > /dev/null 2>&1; then
            run systemctl disable --now "$SERVICE"
            run systemctl reset-failed "$SERVICE" 2> /dev/null || true
        fi
    fi
    remove_file "$UNIT"
    if live; then run systemctl daemon-reload; fi
    remove_tree "$ROOT$VENV"
    if [[ -d $ROOT/opt/edge-llm ]] && (( !DRY_RUN )); then
        rmdir --ignore-fail-on-non-empty "$ROOT/opt/edge-llm"
    fi
    if live && getent passwd "$USER_NAME" > /dev/null; then
        run userdel "$USER_NAME"
        if getent group "$USER_NAME" > /dev/null; then run groupdel "$USER_NAME"; fi
    fi
    remove_file "$SYSUSERS"
    if (( PURGE )); then
        remove_tree "$ROOT/etc/edge-llm"
        remove_tree "$ROOT$STATE_DIR"
        remove_tree "$ROOT$CACHE_DIR"
    else
        note "kept /etc/edge-llm, $STATE_DIR and $CACHE_DIR (remove them with --uninstall --purge)"
    fi
}

UNINSTALL=0 PURGE=0 SKIP_MODEL=0 MODEL_ARG="" FROM="$CHECKOUT"
while (( $# )); do
    case $1 in
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    --from) [[ -n ${2:-} ]] || usage_error "--from needs a path"; FROM="$2"; shift ;;
    --model) [[ -n ${2:-} ]] || usage_error "--model needs a path"; MODEL_ARG="$2"; shift ;;
    --skip-model) SKIP_MODEL=1 ;;
    --root) set_root "${2:-}"; shift ;;
    --root=*) set_root "${1#--root=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --force) ALLOW_NON_PI=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
    esac
    shift
done
(( !PURGE || UNINSTALL )) || usage_error "--purge goes with --uninstall"
require_target
paths

if (( UNINSTALL )); then do_uninstall; else do_install; fi

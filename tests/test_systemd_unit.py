"""systemd/edge-llm.service: systemd-analyze verify and security, and the directives we rely on.

systemd-analyze comes from Debian's systemd package; tests/system_tools.py installs it when missing.
"""
from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from tests import system_tools

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edge-llm.service"
ENV_EXAMPLE = REPO / "systemd" / "edge-llm.env.example"
EXEC = "/opt/edge-llm/venv/bin/edge-llm"


def analyze() -> str:
    return system_tools.systemd_analyze()


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


UNIT_TEXT = UNIT.read_text()
U = parse(UNIT_TEXT)
S = U["Service"]


def one(key: str) -> str:
    assert len(S[key]) == 1, f"{key}: {S[key]}"
    return S[key][0]


def test_verify_passes(tmp_path):
    # The real ExecStart does not exist on a build machine: verify a copy whose ExecStart
    # points at an executable stand-in, and everything else byte for byte the same.
    fake = tmp_path / "bin" / "edge-llm"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert UNIT_TEXT.count(EXEC) == 1
    copy = tmp_path / "edge-llm.service"
    copy.write_text(UNIT_TEXT.replace(EXEC, str(fake)))
    r = subprocess.run([analyze(), "verify", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # unknown keys, bad values and the like are only warnings: there must be none
    assert "edge-llm.service" not in r.stderr and str(copy) not in r.stderr, r.stderr


def test_verify_of_the_real_file_only_misses_the_venv():
    r = subprocess.run([analyze(), "verify", str(UNIT)], capture_output=True, text=True)
    complaints = [line for line in r.stderr.splitlines() if "edge-llm.service" in line]
    assert complaints and all(EXEC in line and "not executable" in line for line in complaints), r.stderr


def test_security_exposure_is_low():
    r = subprocess.run([analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for edge-llm\.service: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout      # 1.9 when written; raise only with a reason


def test_notify_watchdog_restart():
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30s"
    assert one("Restart") == "on-failure"
    assert U["Unit"]["StartLimitIntervalSec"] and U["Unit"]["StartLimitBurst"]
    assert U["Install"]["WantedBy"] == ["multi-user.target"]


def test_user_dirs_and_environment():
    assert one("User") == "edge-llm"
    assert one("SupplementaryGroups") == "dialout"
    assert one("EnvironmentFile").lstrip("-") == "/etc/edge-llm/edge-llm.env"
    assert one("StateDirectory") == "edge-llm"
    assert one("CacheDirectory") == "edge-llm"
    assert "EDGE_LLM_HOME=/var/cache/edge-llm" in S["Environment"]
    exec_start = one("ExecStart")
    assert exec_start.startswith(f"{EXEC} serve ")
    assert "--host ${EDGE_LLM_HOST}" in exec_start and "--port ${EDGE_LLM_PORT}" in exec_start
    # every variable ExecStart uses has a default in the unit and a line in the example
    example = ENV_EXAMPLE.read_text().splitlines()
    for var in re.findall(r"\$\{?(\w+)\}?", exec_start):
        assert any(e.startswith(f"{var}=") for e in S["Environment"]), var
        assert any(line.startswith(f"{var}=") for line in example), var
    for var in ("EDGE_LLM_MODEL", "EDGE_LLM_API_KEY"):
        assert any(line.startswith(f"{var}=") for line in example), var


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "DevicePolicy": "closed",
}


@pytest.mark.parametrize("key,value", sorted(HARDENING.items()))
def test_hardening(key, value):
    assert one(key) == value


def test_serial_ports_stay_reachable():
    # PrivateDevices=yes would hide them; the device cgroup allows exactly these instead
    assert one("PrivateDevices") == "no"
    allowed = S["DeviceAllow"]
    for dev in ("/dev/serial0", "/dev/ttyAMA0", "/dev/ttyGS0"):
        assert f"{dev} rw" in allowed
    assert all(a.endswith(" rw") for a in allowed)


def test_no_write_execute_guard_is_explained():
    assert "MemoryDenyWriteExecute" not in S
    assert "MemoryDenyWriteExecute= is left off" in UNIT_TEXT


def test_resources_fit_a_4gb_pi():
    def size(v: str) -> float:
        n, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", v).groups()
        return float(n) * {"": 1 / 2**30, "K": 1 / 2**20, "M": 1 / 2**10, "G": 1}[unit]
    high, hard = size(one("MemoryHigh")), size(one("MemoryMax"))
    assert 1.5 <= high < hard <= 3.0
    assert int(one("Nice")) > 0
    assert int(one("CPUWeight")) < 100

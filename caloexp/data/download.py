"""Getting a real CaloChallenge dataset file onto disk: resumable, verified, fails fast offline.

:func:`ensure_file` returns the local path of a dataset file, downloading it from Zenodo when
it is not there yet: with a progress bar, into ``<name>.part`` (resumed with an HTTP Range
request on the next try, or automatically when the connection drops mid-way), checked
against the known size and checksums (sha256 and/or the MD5 that Zenodo publishes), then
renamed into place atomically. Nothing unverifiable is installed: a transfer that ends
without a Content-Length counts as complete only when the known size/checksum says so.

A file already in the data directory under a known name is verified once before it is used
(a ``<name>.verified`` JSON beside it caches size, mtime and checksums, so later calls skip
re-hashing); one that does not match (another version, a simulator sample under a real
dataset's name, a truncated copy) is reported in one line and never overwritten.

Anything that prevents it (no network, DNS failure, timeout, HTTP error, checksum mismatch,
offline mode) raises :class:`~caloexp.errors.DatasetMissing` whose message is ONE line: what is
missing, the full target path and the URL to fetch it from, and how to run offline on the
embedded data instead. Only the standard library's urllib is used.
"""
from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from caloexp.errors import DatasetMissing

OFFLINE_ENV = "CALOEXP_OFFLINE"            # "1"/"true"/"yes": never touch the network
SKIP_SHA256_ENV = "CALOEXP_SKIP_SHA256"    # "1": trust size only (if a registry hash ever goes stale)
OFFLINE_HINT = "python -m caloexp.train data=embedded"
CHUNK_BYTES = 1 << 20
RETRIES = 3                                 # automatic resumes per call after a dropped connection


@dataclass(frozen=True)
class RemoteFile:
    """Where a dataset file lives and what it must look like (size in bytes, sha256/md5 hex)."""

    record: int
    url: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None


def zenodo_url(record: int, name: str) -> str:
    return f"https://zenodo.org/records/{record}/files/{name}?download=1"


def _zenodo(record: int, name: str, md5: str, size: int | None = None,
            sha256: str | None = None) -> tuple[str, RemoteFile]:
    return name, RemoteFile(record, zenodo_url(record, name), size, sha256, md5)


# CaloChallenge 2022 files. Every file has the MD5 that its Zenodo record publishes (quoted by
# public CaloChallenge data loaders; the two photon values agree with the project's shared notes).
# Sizes and sha256 where the shared notes (../shared/data/calochallenge_files/KNOWN_FILES.txt:
# Git-LFS pointers of a public mirror) record them; no size is known for the other seven files.
KNOWN_FILES: dict[str, RemoteFile] = dict([
    # dataset 1 (DOI 10.5281/zenodo.8099322): photons 121,000 x 368 voxels, pions 120,800 x 533
    _zenodo(8099322, "dataset_1_photons_1.hdf5", "005d2adeda7db034b388112661265656", 173_797_023,
            "54011e9ffcc041e30a029fadcef91d33d6d232fe8492360d706022dbec2c1a6f"),
    _zenodo(8099322, "dataset_1_photons_2.hdf5", "4767715ed56e99565fd9c67340661e70"),
    _zenodo(8099322, "dataset_1_pions_1.hdf5", "6a5f52722064a1bcd8a0bc002f16515d"),
    _zenodo(8099322, "dataset_1_pions_2.hdf5", "fee7457b40127bc23c8ab909e2638ca0"),
    # dataset 2 (DOI 10.5281/zenodo.6366271): 2 x 100,000 x 6,480 voxels
    _zenodo(6366271, "dataset_2_1.hdf5", "e590333e9a2da51b258288d74bd8357a", 1_356_475_617,
            "22bf0cac898be609f3cf3904612f74faf212ea7ecec01d36c580755d0efc5614"),
    _zenodo(6366271, "dataset_2_2.hdf5", "7a56fd68aa53ded37c2ac445694d9736", 1_366_708_391,
            "7561885bda9e2cfa2b0464d7ba779cd4066d89e91ce6105d73441254481e5f3a"),
    # dataset 3 (DOI 10.5281/zenodo.6366324): 4 x 50,000 x 40,500 voxels
    _zenodo(6366324, "dataset_3_1.hdf5", "d33f03418aa311b0965452fcbef1ff87"),
    _zenodo(6366324, "dataset_3_2.hdf5", "911dec2c40aafa64a07b7450b80881bf"),
    _zenodo(6366324, "dataset_3_3.hdf5", "5ea62f6831a1821bb5035fafc9f030e8"),
    _zenodo(6366324, "dataset_3_4.hdf5", "5e8d82e6a6c28c6914a3b602a1cfa299"),
])


class _Incomplete(Exception):
    """The transfer stopped early; the .part keeps what arrived (resumable)."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _missing(name: str, target: Path, url: str | None, why: str) -> DatasetMissing:
    where = f"download {url} to {target}" if url else f"put the file at {target}"
    msg = f"{name} is missing ({why}): {where}, or run offline on the embedded data: {OFFLINE_HINT}"
    return DatasetMissing(" ".join(msg.split()))      # guaranteed one line


def file_digests(path: Path, algos: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of ``path`` for each algorithm (one pass over the file)."""
    hashes = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES * 4):
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def sha256_of(path: Path) -> str:
    return file_digests(path, ("sha256",))["sha256"]


def _mismatch(path: Path, expected: dict[str, str]) -> str | None:
    """'<algo> <got>…, expected <want>…' for the first checksum that differs, else None."""
    if not expected:
        return None
    got = file_digests(path, tuple(expected))
    for algo, want in expected.items():
        if got[algo] != want:
            return f"{algo} {got[algo][:12]}…, expected {want[:12]}…"
    return None


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _marker_ok(target: Path, expected: dict[str, str]) -> bool:
    try:
        m = json.loads(_marker(target).read_text())
        st = target.stat()
        return m == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **expected}
    except (OSError, ValueError):
        return False


def _write_marker(target: Path, expected: dict[str, str]) -> None:
    st = target.stat()
    try:
        _marker(target).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, **expected}))
    except OSError:  # a read-only data directory: verified now, verified again next time
        pass


def _resolve(host: str, port: int, timeout: float) -> None:
    """DNS lookup bounded by ``timeout`` (getaddrinfo itself has no timeout)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    result: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            result.append(exc)

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise TimeoutError(f"DNS lookup of {host} timed out after {timeout:g} s")
    if result[0] is not None:
        raise OSError(f"no network? cannot resolve {host} ({result[0]})")


def _content_range_start(header: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", header or "")
    return int(m.group(1)) if m else None


def _fetch(url: str, part: Path, size: int | None, timeout: float, desc: str) -> bool:
    """One HTTP attempt: continue ``part`` from its size (Range) or restart it if Range is ignored.

    Returns True when the response declared a Content-Length and all of it arrived, False when
    the body simply ended (no Content-Length): then only the known size/checksum can tell
    whether the file is complete."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "caloexp-download/1", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have and size is not None and have == size:
            return True                                 # already complete
        if exc.code == 416 and have:
            part.unlink(missing_ok=True)                # stale/oversized partial file: start over
            raise _Incomplete("server refused the resume range; restarting") from None
        raise
    with resp:
        if have and resp.status == 206 and _content_range_start(resp.headers.get("Content-Range")) == have:
            mode = "ab"
        else:                                           # 200: server ignored Range -> restart
            have, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else size
        from tqdm import tqdm
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=desc, disable=None, file=sys.stderr) as bar:
            got = 0
            while True:
                block = resp.read(CHUNK_BYTES)
                if not block:
                    break
                f.write(block)
                got += len(block)
                bar.update(len(block))
        if length and length.isdigit():
            if got < int(length):
                raise _Incomplete(f"connection closed after {have + got} bytes")
            return True
        return False


def _not_the_file(name: str, target: Path, url: str | None, why: str) -> DatasetMissing:
    """One line for a file under a known name that is not the published file (left untouched)."""
    fetch = f"download {url} to {target}" if url else f"put the published {name} at {target}"
    return DatasetMissing(" ".join(
        f"{target}: not the published {name} ({why}): another version, a simulator sample or a truncated "
        f"copy under its name? It is not used; move it away and {fetch}, set {SKIP_SHA256_ENV}=1 to accept "
        f"it anyway, or run offline on the embedded data: {OFFLINE_HINT}".split()))


def ensure_file(name: str, data_dir: str | Path, url: str | None = None, sha256: str | None = None,
                size: int | None = None, timeout: float = 10.0, offline: bool = False,
                md5: str | None = None) -> Path:
    """Local path of dataset file ``name`` in ``data_dir``, downloading and verifying it if needed.

    ``url``/``sha256``/``md5``/``size`` default to the :data:`KNOWN_FILES` entry. A file already
    there is verified once (cached in ``<name>.verified`` by size + mtime); a mismatch raises
    (one line) and the file is left alone. A download is installed only when its size and
    checksums match; without any known size or checksum, only when the server declared a
    Content-Length and all of it arrived. ``timeout`` bounds the DNS lookup, the connection and
    every read. ``offline=True`` (or ``CALOEXP_OFFLINE=1``) never touches the network. Raises
    :class:`DatasetMissing` (one line) when the file cannot be had.
    """
    known = KNOWN_FILES.get(name)
    url = url or (known.url if known else None)
    sha256 = (sha256 or (known.sha256 if known else None) or "").lower() or None
    md5 = (md5 or (known.md5 if known else None) or "").lower() or None
    size = size if size is not None else (known.size if known else None)
    if _truthy(os.environ.get(SKIP_SHA256_ENV)):
        sha256 = md5 = None
    expected = {k: v for k, v in (("sha256", sha256), ("md5", md5)) if v}
    target = Path(data_dir).expanduser() / name

    if target.is_file():
        have = target.stat().st_size
        if size is not None and have != size:
            raise _not_the_file(name, target, url, f"{have} bytes, expected {size}")
        if not expected or _marker_ok(target, expected):
            return target
        why = _mismatch(target, expected)
        if why:
            raise _not_the_file(name, target, url, why)
        _write_marker(target, expected)
        return target

    if offline or _truthy(os.environ.get(OFFLINE_ENV)):
        why = f"not on disk; offline mode ({OFFLINE_ENV}=1 or offline=True): no download attempted"
        raise _missing(name, target, url, why)
    if not url:
        raise _missing(name, target, None, "not on disk and no download URL is known for it")

    part = target.with_name(name + ".part")
    length_met = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme in ("http", "https") and parsed.hostname:
            _resolve(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), timeout)
        for attempt in range(RETRIES + 1):
            before = part.stat().st_size if part.exists() else 0
            if size is not None and before > size:
                part.unlink()
                before = 0
            if size is not None and before == size:
                break
            try:
                length_met = _fetch(url, part, size, timeout, desc=name)
                break
            except (_Incomplete, http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout) as exc:
                after = part.stat().st_size if part.exists() else 0
                if attempt == RETRIES or (after <= before and not isinstance(exc, _Incomplete)):
                    raise _Incomplete(f"{exc}; {after} bytes kept in {part} for a later resume") from None
    except urllib.error.HTTPError as exc:
        raise _missing(name, target, url, f"download failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _missing(name, target, url, f"download failed: {exc.reason}") from None
    except _Incomplete as exc:
        raise _missing(name, target, url, f"download interrupted: {exc}") from None
    except (http.client.HTTPException, OSError) as exc:
        detail = f"{exc}" if type(exc) is OSError else f"{exc.__class__.__name__}: {exc}"
        raise _missing(name, target, url, f"download failed: {detail}") from None

    have = part.stat().st_size if part.exists() else 0
    if size is not None and have != size:
        if have > size:
            part.unlink(missing_ok=True)
        raise _missing(name, target, url, f"downloaded {have} bytes, expected {size}"
                       + ("; partial file kept for resume" if have < size else ""))
    if not expected and size is None and not length_met:
        part.unlink(missing_ok=True)
        raise _missing(name, target, url, f"the transfer ended after {have} bytes without a Content-Length and "
                       "no size or checksum is known to prove it complete (deleted; not trusted)")
    why = _mismatch(part, expected)
    if why:
        part.unlink(missing_ok=True)
        early = "" if length_met or size is not None else \
            f"; the transfer ended after {have} bytes without a Content-Length: incomplete or wrong"
        raise _missing(name, target, url, f"downloaded file has {why}{early} (deleted; if the registry "
                       f"checksum is stale set {SKIP_SHA256_ENV}=1)")
    os.replace(part, target)
    if expected:
        _write_marker(target, expected)
    return target

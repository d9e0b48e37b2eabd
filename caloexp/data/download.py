"""Getting a real CaloChallenge dataset file onto disk: resumable, verified, fails fast offline.

:func:`ensure_file` returns the local path of a dataset file, downloading it from Zenodo when
it is not there yet: with a progress bar, into ``<name>.part`` (resumed with an HTTP Range
request on the next try, or automatically when the connection drops mid-way), checked
against the known size and sha256, then renamed into place atomically. A ``<name>.verified``
marker (size, mtime, sha256) means later calls skip re-hashing.

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
    """Where a dataset file lives and what it must look like (size in bytes, sha256 hex)."""

    record: int
    url: str
    size: int | None = None
    sha256: str | None = None


def zenodo_url(record: int, name: str) -> str:
    return f"https://zenodo.org/records/{record}/files/{name}?download=1"


def _zenodo(record: int, name: str, size: int | None = None, sha256: str | None = None) -> tuple[str, RemoteFile]:
    return name, RemoteFile(record, zenodo_url(record, name), size, sha256)


# CaloChallenge 2022 files. Sizes and sha256 as recorded in the project's shared notes
# (../shared/data/calochallenge_files/KNOWN_FILES.txt: from the Git-LFS pointers of a public
# mirror, assumed identical to the Zenodo files); None where no fact is known.
KNOWN_FILES: dict[str, RemoteFile] = dict([
    # dataset 1 (DOI 10.5281/zenodo.8099322): photons 121,000 x 368 voxels, pions 120,800 x 533
    _zenodo(8099322, "dataset_1_photons_1.hdf5", 173_797_023,
            "54011e9ffcc041e30a029fadcef91d33d6d232fe8492360d706022dbec2c1a6f"),
    _zenodo(8099322, "dataset_1_photons_2.hdf5"),
    _zenodo(8099322, "dataset_1_pions_1.hdf5"),
    _zenodo(8099322, "dataset_1_pions_2.hdf5"),
    # dataset 2 (DOI 10.5281/zenodo.6366271): 2 x 100,000 x 6,480 voxels
    _zenodo(6366271, "dataset_2_1.hdf5", 1_356_475_617,
            "22bf0cac898be609f3cf3904612f74faf212ea7ecec01d36c580755d0efc5614"),
    _zenodo(6366271, "dataset_2_2.hdf5", 1_366_708_391,
            "7561885bda9e2cfa2b0464d7ba779cd4066d89e91ce6105d73441254481e5f3a"),
    # dataset 3 (DOI 10.5281/zenodo.6366324): 4 x 50,000 x 40,500 voxels
    *[_zenodo(6366324, f"dataset_3_{i}.hdf5") for i in range(1, 5)],
])


class _Incomplete(Exception):
    """The transfer stopped early; the .part keeps what arrived (resumable)."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _missing(name: str, target: Path, url: str | None, why: str) -> DatasetMissing:
    where = f"download {url} to {target}" if url else f"put the file at {target}"
    msg = f"{name} is missing ({why}): {where}, or run offline on the embedded data: {OFFLINE_HINT}"
    return DatasetMissing(" ".join(msg.split()))      # guaranteed one line


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES * 4):
            h.update(block)
    return h.hexdigest()


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _marker_ok(target: Path, sha256: str) -> bool:
    try:
        m = json.loads(_marker(target).read_text())
        st = target.stat()
        return m == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256.lower()}
    except (OSError, ValueError):
        return False


def _write_marker(target: Path, sha256: str) -> None:
    st = target.stat()
    _marker(target).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                           "sha256": sha256.lower()}))


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


def _fetch(url: str, part: Path, size: int | None, timeout: float, desc: str) -> None:
    """One HTTP attempt: continue ``part`` from its size (Range) or restart it if Range is ignored."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "caloexp-download/1", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have and size is not None and have == size:
            return                                      # already complete
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
        if length and length.isdigit() and got < int(length):
            raise _Incomplete(f"connection closed after {have + got} bytes")


def ensure_file(name: str, data_dir: str | Path, url: str | None = None, sha256: str | None = None,
                size: int | None = None, timeout: float = 10.0, offline: bool = False) -> Path:
    """Local path of dataset file ``name`` in ``data_dir``, downloading and verifying it if needed.

    ``url``/``sha256``/``size`` default to the :data:`KNOWN_FILES` entry. ``timeout`` bounds the
    DNS lookup, the connection and every read. ``offline=True`` (or ``CALOEXP_OFFLINE=1``) never
    touches the network. Raises :class:`DatasetMissing` (one line) when the file cannot be had.
    """
    known = KNOWN_FILES.get(name)
    url = url or (known.url if known else None)
    sha256 = (sha256 or (known.sha256 if known else None) or "").lower() or None
    size = size if size is not None else (known.size if known else None)
    if _truthy(os.environ.get(SKIP_SHA256_ENV)):
        sha256 = None
    target = Path(data_dir).expanduser() / name

    if target.is_file() and (size is None or target.stat().st_size == size):
        if sha256 is None or _marker_ok(target, sha256):
            return target
        got = sha256_of(target)
        if got != sha256:
            raise _missing(name, target, url, f"{target} has sha256 {got[:12]}…, expected {sha256[:12]}…: "
                           f"corrupt or another version; delete it to re-download, or set {SKIP_SHA256_ENV}=1 "
                           "to accept it")
        _write_marker(target, sha256)
        return target

    present = f"{target} has {target.stat().st_size} bytes, expected {size}" if target.is_file() else "not on disk"
    if offline or _truthy(os.environ.get(OFFLINE_ENV)):
        why = f"{present}; offline mode ({OFFLINE_ENV}=1 or offline=True): no download attempted"
        raise _missing(name, target, url, why)
    if not url:
        raise _missing(name, target, None, f"{present} and no download URL is known for it")

    part = target.with_name(name + ".part")
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
                _fetch(url, part, size, timeout, desc=name)
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
    if sha256 is not None:
        got = sha256_of(part)
        if got != sha256:
            part.unlink(missing_ok=True)
            raise _missing(name, target, url, f"downloaded file has sha256 {got[:12]}…, expected {sha256[:12]}… "
                           f"(deleted; if the registry hash is stale set {SKIP_SHA256_ENV}=1)")
    os.replace(part, target)
    if sha256 is not None:
        _write_marker(target, sha256)
    return target

"""ensure_file against local HTTP servers on 127.0.0.1 (nothing leaves the machine)."""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from caloexp.data import download
from caloexp.data.download import KNOWN_FILES, ensure_file
from caloexp.errors import DatasetMissing

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)      # a few MB, not a multiple of the read size
SHA = hashlib.sha256(PAYLOAD).hexdigest()
SHARED_KNOWN = Path(__file__).resolve().parents[2] / "shared" / "data" / "calochallenge_files" / "KNOWN_FILES.txt"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /data.bin; behaviour set per server: ranges, drop_after, status."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:       # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        srv = self.server
        srv.requests.append(dict(self.headers))
        if srv.status != 200:
            self.send_error(srv.status)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            body = PAYLOAD[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            body = PAYLOAD
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        drop = srv.drop_after.pop(0) if srv.drop_after else None
        if drop is not None:                     # send part of the body, then cut the connection
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ranges: bool = True, status: int = 200, drop_after: list[int] | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ranges, self.status = ranges, status
        self.drop_after = list(drop_after or [])
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/data.bin"


@pytest.fixture
def serve():
    servers = []

    def start(**kw) -> _Server:
        srv = _Server(**kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    monkeypatch.delenv(download.SKIP_SHA256_ENV, raising=False)


def _fetch(tmp_path: Path, srv: _Server, **kw) -> Path:
    kw.setdefault("sha256", SHA)
    kw.setdefault("size", len(PAYLOAD))
    return ensure_file("data.bin", tmp_path, url=srv.url, timeout=5.0, **kw)


def test_download_verifies_and_caches(tmp_path, serve):
    srv = serve()
    path = _fetch(tmp_path, srv)
    assert path == tmp_path / "data.bin" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "data.bin.part").exists()
    assert (tmp_path / "data.bin.verified").exists()
    t = time.perf_counter()
    assert _fetch(tmp_path, srv) == path          # second call: no request, no re-hash needed
    assert len(srv.requests) == 1 and time.perf_counter() - t < 1.0


def test_resume_after_dropped_connection(tmp_path, serve):
    srv = serve(drop_after=[1_000_000])           # first response is cut after ~1 MB
    path = _fetch(tmp_path, srv)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA
    assert len(srv.requests) == 2
    assert "Range" not in srv.requests[0]
    start = int(re.match(r"bytes=(\d+)-", srv.requests[1]["Range"]).group(1))
    assert 0 < start <= 1_000_000                 # resumed from what the .part held


def test_resume_from_preseeded_part(tmp_path, serve):
    srv = serve()
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:777_777])
    path = _fetch(tmp_path, srv)
    assert srv.requests[0]["Range"] == "bytes=777777-"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA


def test_server_ignoring_range_restarts(tmp_path, serve):
    srv = serve(ranges=False)
    (tmp_path / "data.bin.part").write_bytes(b"\0" * 500_000)   # garbage: must not be kept
    path = _fetch(tmp_path, srv)
    assert "Range" in srv.requests[0]
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_no_file(tmp_path, serve):
    srv = serve()
    with pytest.raises(DatasetMissing) as err:
        _fetch(tmp_path, srv, sha256="0" * 64)
    msg = str(err.value)
    assert "\n" not in msg and "sha256" in msg and "data=embedded" in msg
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()


def test_http_404(tmp_path, serve):
    srv = serve(status=404)
    with pytest.raises(DatasetMissing) as err:
        _fetch(tmp_path, srv)
    msg = str(err.value)
    assert "404" in msg and str(tmp_path / "data.bin") in msg and srv.url in msg and "\n" not in msg


def test_unreachable_fails_fast_with_one_line(tmp_path):
    with socket.socket() as s:                    # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/dataset_1_photons_1.hdf5"
    t = time.perf_counter()
    with pytest.raises(DatasetMissing) as err:
        ensure_file("dataset_1_photons_1.hdf5", tmp_path, url=url, timeout=2.0)
    assert time.perf_counter() - t < 5.0
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "dataset_1_photons_1.hdf5") in msg and url in msg and "data=embedded" in msg


def test_offline_mode_never_connects(tmp_path, serve, monkeypatch):
    srv = serve()
    with pytest.raises(DatasetMissing) as err:
        _fetch(tmp_path, srv, offline=True)
    assert "offline" in str(err.value) and "data=embedded" in str(err.value)
    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    with pytest.raises(DatasetMissing):
        _fetch(tmp_path, srv)
    assert srv.requests == []
    # the default registry entry names the Zenodo URL and target path, without any network use
    with pytest.raises(DatasetMissing) as err:
        ensure_file("dataset_1_photons_1.hdf5", tmp_path)
    msg = str(err.value)
    assert "zenodo.org/records/8099322/files/dataset_1_photons_1.hdf5" in msg
    assert str(tmp_path / "dataset_1_photons_1.hdf5") in msg


def test_existing_file_is_used_and_verified_once(tmp_path, monkeypatch):
    (tmp_path / "data.bin").write_bytes(PAYLOAD)
    assert ensure_file("data.bin", tmp_path, url=None, sha256=SHA, size=len(PAYLOAD), offline=True)
    assert (tmp_path / "data.bin.verified").exists()
    calls = []
    monkeypatch.setattr(download, "sha256_of", lambda p: calls.append(p) or SHA)
    ensure_file("data.bin", tmp_path, sha256=SHA, size=len(PAYLOAD), offline=True)
    assert calls == []                            # marker valid: no re-hash
    os.utime(tmp_path / "data.bin", ns=(1, 1))    # file changed since: hash again
    ensure_file("data.bin", tmp_path, sha256=SHA, size=len(PAYLOAD), offline=True)
    assert len(calls) == 1


def test_corrupt_existing_file_is_reported_not_deleted(tmp_path):
    bad = bytearray(PAYLOAD)
    bad[100] ^= 0xFF
    (tmp_path / "data.bin").write_bytes(bytes(bad))
    with pytest.raises(DatasetMissing) as err:
        ensure_file("data.bin", tmp_path, sha256=SHA, size=len(PAYLOAD), offline=True)
    assert "sha256" in str(err.value) and "\n" not in str(err.value)
    assert (tmp_path / "data.bin").exists()


def test_registry_photons():
    f = KNOWN_FILES["dataset_1_photons_1.hdf5"]
    assert f.record == 8099322
    assert f.url.startswith("https://zenodo.org/records/8099322/files/dataset_1_photons_1.hdf5")
    assert f.size == 173797023 and len(f.sha256) == 64


@pytest.mark.skipif(not SHARED_KNOWN.exists(), reason="../shared/data/calochallenge_files absent")
def test_registry_agrees_with_shared_notes():
    rows = {}
    for line in SHARED_KNOWN.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].endswith(".hdf5") and parts[1].isdigit():
            rows[parts[0]] = (int(parts[1]), int(parts[2]), parts[3])
    assert "dataset_1_photons_1.hdf5" in rows
    for name, (record, size, sha) in rows.items():
        f = KNOWN_FILES[name]
        assert (f.record, f.size, f.sha256) == (record, size, sha), name
        assert f.url == f"https://zenodo.org/records/{record}/files/{name}?download=1"

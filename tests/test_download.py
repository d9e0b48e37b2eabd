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
        if srv.no_length:                        # HTTP/1.0-style body: ends when the connection closes
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[:srv.no_length])
            self.wfile.flush()
            self.close_connection = True
            return
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

    def __init__(self, ranges: bool = True, status: int = 200, drop_after: list[int] | None = None,
                 no_length: int = 0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ranges, self.status, self.no_length = ranges, status, no_length
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
    real = download.file_digests
    monkeypatch.setattr(download, "file_digests", lambda p, algos: calls.append(p) or real(p, algos))
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
    assert (tmp_path / "data.bin").read_bytes() == bytes(bad)


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


# -- issue 8.6: nothing unverifiable is trusted ------------------------------------------------------

MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_every_known_file_has_a_checksum():
    assert len(KNOWN_FILES) == 10
    for name, f in KNOWN_FILES.items():
        assert re.fullmatch(r"[0-9a-f]{32}", f.md5 or ""), name
        assert (f.size is None) == (f.sha256 is None), name
    assert KNOWN_FILES["dataset_3_4.hdf5"].record == 6366324


@pytest.mark.skipif(not SHARED_KNOWN.exists(), reason="../shared/data/calochallenge_files absent")
def test_registry_md5_agrees_with_shared_notes():
    quoted = dict(re.findall(r"(dataset_\w+\.hdf5) ([0-9a-f]{32})", SHARED_KNOWN.read_text()))
    assert len(quoted) >= 2
    for name, md5 in quoted.items():
        assert KNOWN_FILES[name].md5 == md5, name


def test_transfer_ending_early_without_content_length_is_not_installed(tmp_path, serve):
    srv = serve(no_length=len(PAYLOAD) // 2)     # half the file, then the server closes the connection
    with pytest.raises(DatasetMissing) as err:
        ensure_file("data.bin", tmp_path, url=srv.url, md5=MD5, timeout=5.0)
    msg = str(err.value)
    assert "\n" not in msg and f"md5" in msg and f"ended after {len(PAYLOAD) // 2} bytes without a Content-Length" in msg
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()


def test_transfer_without_content_length_is_verified_by_md5(tmp_path, serve):
    srv = serve(no_length=len(PAYLOAD))          # complete, but only the checksum can tell
    path = ensure_file("data.bin", tmp_path, url=srv.url, md5=MD5, timeout=5.0)
    assert path.read_bytes() == PAYLOAD
    assert '"md5": "%s"' % MD5 in (tmp_path / "data.bin.verified").read_text()
    srv2 = serve(no_length=len(PAYLOAD))         # nothing known at all: cannot be proven complete
    with pytest.raises(DatasetMissing, match="without a Content-Length and no size or checksum is known"):
        ensure_file("other.bin", tmp_path, url=srv2.url.replace("data.bin", "other.bin"), timeout=5.0)
    assert not (tmp_path / "other.bin").exists() and not (tmp_path / "other.bin.part").exists()


def test_simulator_file_under_a_real_name_is_refused_in_one_line_and_kept(tmp_path, serve):
    """A valid CaloChallenge-format file (here: random showers) placed under dataset 1 pions' name."""
    from caloexp.data import calochallenge
    from conftest import random_showers

    e, s = random_showers(50, n_voxels=533)
    fake = calochallenge.write(tmp_path / "dataset_1_pions_1.hdf5", e, s)
    content = fake.read_bytes()
    srv = serve()
    with pytest.raises(DatasetMissing) as err:   # online, with a server that would answer: nothing fetched
        ensure_file("dataset_1_pions_1.hdf5", tmp_path, url=srv.url, timeout=5.0)
    msg = str(err.value)
    assert msg.startswith(f"{fake}: not the published dataset_1_pions_1.hdf5 (md5 ") and "\n" not in msg
    assert "expected 6a5f52722064" in msg and "simulator sample" in msg
    assert fake.read_bytes() == content and srv.requests == [] and not (tmp_path / fake.name).with_suffix(
        ".hdf5.verified").exists()
    # a known size settles it before any hashing
    (tmp_path / "dataset_1_photons_1.hdf5").write_bytes(content)
    with pytest.raises(DatasetMissing, match=r"not the published dataset_1_photons_1.hdf5 \(\d+ bytes, "
                                             r"expected 173797023\)"):
        ensure_file("dataset_1_photons_1.hdf5", tmp_path, offline=True)


def test_training_data_module_verifies_a_file_found_under_a_known_name(tmp_path):
    """Before training: data=pions with a simulator sample under the real name stops with that line."""
    from caloexp.data import calochallenge
    from caloexp.data.datamodule import ShowerDataModule
    from conftest import random_showers

    e, s = random_showers(50, n_voxels=533)
    calochallenge.write(tmp_path / "dataset_1_pions_1.hdf5", e, s)
    dm = ShowerDataModule("dataset_1_pions", "dataset_1_pions", str(tmp_path), source="files",
                          files=["dataset_1_pions_1.hdf5"], download=False)
    with pytest.raises(DatasetMissing, match="not the published dataset_1_pions_1.hdf5"):
        dm.prepare()

"""Tests for training.data.download_mnist against a local HTTP server, never the internet."""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.data import DataError, download_mnist, load_data

SHAPES = {
    "train-images-idx3-ubyte.gz": (6, 4, 4),
    "train-labels-idx1-ubyte.gz": (6,),
    "t10k-images-idx3-ubyte.gz": (3, 4, 4),
    "t10k-labels-idx1-ubyte.gz": (3,),
}


def fake_idx_gz(shape: tuple[int, ...]) -> bytes:
    array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape) % 10
    header = struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    return gzip.compress(header + array.tobytes(), mtime=0)


FILES = {name: fake_idx_gz(shape) for name, shape in SHAPES.items()}
CHECKSUMS = {name: hashlib.md5(data).hexdigest() for name, data in FILES.items()}


class Server:
    """Serves the folders under root over HTTP and records the paths asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        handler = functools.partial(self.Handler, self, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # A short poll interval so that shutdown() returns at once rather than in 0.5 s.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, recorder: Server, *args: Any, **kwargs: Any) -> None:
            self.recorder = recorder
            super().__init__(*args, **kwargs)

        def do_GET(self) -> None:
            self.recorder.requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    def mirror(self, folder: str, files: dict[str, bytes] | None = None) -> str:
        """Make a folder that serves files (FILES by default); return its URL."""
        (self.root / folder).mkdir()
        for name, data in (FILES if files is None else files).items():
            (self.root / folder / name).write_bytes(data)
        return self.missing_mirror(folder)

    def missing_mirror(self, folder: str) -> str:
        """Return the URL of a folder that does not exist, so every file in it is a 404."""
        return f"http://127.0.0.1:{self.httpd.server_port}/{folder}/"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib sends even 127.0.0.1 through a proxy named in the environment.
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "www"
    root.mkdir()
    server = Server(root)
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
    server.thread.join()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mnist"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def test_download_lands_all_files(server: Server, data_dir: Path) -> None:
    paths = download_mnist(data_dir, [server.mirror("a")], timeout=5, checksums=CHECKSUMS)
    assert paths == [data_dir / name for name in FILES]
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == FILES


def test_downloaded_files_load_as_mnist(server: Server, data_dir: Path) -> None:
    download_mnist(data_dir, [server.mirror("a")], timeout=5, checksums=CHECKSUMS)
    data = load_data(data_dir)
    assert data.x_train.shape == (6, 16)
    assert data.x_test.shape == (3, 16)


def test_download_rejects_md5_mismatch_and_keeps_nothing(server: Server, data_dir: Path) -> None:
    name = "train-images-idx3-ubyte.gz"
    mirror = server.mirror("a")
    with pytest.raises(DataError, match=re.escape(mirror + name) + ": md5 mismatch: .*not kept"):
        download_mnist(data_dir, [mirror], timeout=5, checksums={name: "0" * 32})
    assert list(data_dir.iterdir()) == []


def test_download_falls_back_after_404(server: Server, data_dir: Path) -> None:
    download_mnist(
        data_dir,
        [server.missing_mirror("gone"), server.mirror("b")],
        timeout=5,
        checksums=CHECKSUMS,
    )
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == FILES
    assert server.requests[:2] == [
        "/gone/train-images-idx3-ubyte.gz",
        "/b/train-images-idx3-ubyte.gz",
    ]


def test_download_falls_back_after_md5_mismatch(server: Server, data_dir: Path) -> None:
    corrupt = {name: b"corrupt" for name in FILES}
    mirrors = [server.mirror("bad", corrupt), server.mirror("good")]
    download_mnist(data_dir, mirrors, timeout=5, checksums=CHECKSUMS)
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == FILES


def test_download_raises_404_when_all_mirrors_fail(server: Server, data_dir: Path) -> None:
    mirrors = [server.missing_mirror("gone"), server.missing_mirror("lost")]
    with pytest.raises(DataError, match=r"/lost/train-images-idx3-ubyte\.gz: download failed.*404"):
        download_mnist(data_dir, mirrors, timeout=5, checksums=CHECKSUMS)
    assert list(data_dir.iterdir()) == []


def test_download_skips_file_already_present(server: Server, data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    present = "train-labels-idx1-ubyte.gz"
    (data_dir / present).write_bytes(FILES[present])
    download_mnist(data_dir, [server.mirror("a")], timeout=5, checksums=CHECKSUMS)
    assert sorted(server.requests) == sorted(f"/a/{name}" for name in FILES if name != present)


def test_download_replaces_file_with_wrong_md5(server: Server, data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    name = "train-labels-idx1-ubyte.gz"
    (data_dir / name).write_bytes(b"stale")
    download_mnist(data_dir, [server.mirror("a")], timeout=5, checksums=CHECKSUMS)
    assert (data_dir / name).read_bytes() == FILES[name]
    assert f"/a/{name}" in server.requests


def test_download_reports_unreachable_mirror(data_dir: Path) -> None:
    url = closed_port_url()
    with pytest.raises(
        DataError, match=re.escape(url + "train-images-idx3-ubyte.gz") + ": download failed"
    ):
        download_mnist(data_dir, [url], timeout=5, checksums=CHECKSUMS)
    assert list(data_dir.iterdir()) == []

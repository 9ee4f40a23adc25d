"""A loopback HTTP server for tests: fixed responses per path, hit counts, recorded headers.

Usage:
    from tests.http_fixture import FixtureServer, fixture_server  # the second is a pytest fixture

    def test_x(fixture_server):
        fixture_server.add("/a.safetensors", body)
        fixture_server.redirect("/old", "/a.safetensors")
        fixture_server.add("/broken", body, truncate_at=100)   # closes the connection early
        url = fixture_server.url("/a.safetensors")
        ...
        assert fixture_server.hits["/a.safetensors"] == 1

Routes match the path with its query first, then the path alone. Unknown paths answer 404.
The server binds 127.0.0.1 on a free port and runs in a daemon thread; nothing leaves the host.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    truncate_at: int | None = None  # send the full Content-Length, then only this many bytes
    delay_s: float = 0.0  # wait before answering (to make concurrent requests overlap)
    require_auth: str | None = None  # the exact Authorization value wanted; else 401
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    drip_s: float = 0.0  # send the body one byte at a time, this many seconds apart (a stalling host)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class FixtureServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, body: bytes = b"", status: int = 200, **options: object) -> Route:
        route = Route(status=status, body=body, **options)  # type: ignore[arg-type]
        self.routes[path] = route
        return route

    def add_json(self, path: str, payload: str, status: int = 200, **options: object) -> Route:
        headers = {"Content-Type": "application/json"}
        return self.add(path, payload.encode(), status=status, headers=headers, **options)

    def redirect(self, path: str, location: str, status: int = 302) -> Route:
        return self.add(path, status=status, headers={"Location": location})

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]

    def start(self) -> FixtureServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                server._serve(self)

            def do_HEAD(self) -> None:  # noqa: N802
                server._serve(self, head=True)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # keep pytest output clean

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler, head: bool = False) -> None:
        path_only = handler.path.split("?", 1)[0]
        with self._lock:
            self.hits[handler.path] += 1
            if path_only != handler.path:
                self.hits[path_only] += 1
            self.requests.append(Seen(handler.command, handler.path, dict(handler.headers.items())))
        route = self.routes.get(handler.path) or self.routes.get(path_only)
        if route is None:
            route = Route(status=404, body=b"not found")
        if route.delay_s:
            time.sleep(route.delay_s)
        if route.require_auth is not None and handler.headers.get("Authorization") != route.require_auth:
            route = Route(status=401, body=b"unauthorized")
        handler.send_response(route.status)
        for name, value in route.headers.items():
            handler.send_header(name, value)
        if route.send_length:
            handler.send_header("Content-Length", str(len(route.body)))
        handler.end_headers()
        if head:
            return
        body = route.body if route.truncate_at is None else route.body[: route.truncate_at]
        try:
            if route.drip_s:
                for index in range(len(body)):
                    handler.wfile.write(body[index : index + 1])
                    handler.wfile.flush()
                    time.sleep(route.drip_s)
            else:
                handler.wfile.write(body)
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (a refused oversize download, say)
        if route.truncate_at is not None:
            handler.close_connection = True


@pytest.fixture
def fixture_server() -> Iterator[FixtureServer]:
    server = FixtureServer().start()
    try:
        yield server
    finally:
        server.stop()


# --- payloads: small LoRA-like files and archives built in memory ---


def safetensors_bytes(seed: int = 0, rank: int = 2) -> bytes:
    """A tiny PEFT-style LoRA file; different seeds give different bytes."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    prefix = "transformer.single_transformer_blocks.0.attn.to_q"
    return save(
        {
            f"{prefix}.lora_A.weight": rng.standard_normal((rank, 8)).astype(np.float32),
            f"{prefix}.lora_B.weight": rng.standard_normal((8, rank)).astype(np.float32),
        }
    )


def tar_bytes(
    members: dict[str, bytes],
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
    compression: str = "",
) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name, target in (hardlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.LNKTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    import io
    import stat
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return buf.getvalue()

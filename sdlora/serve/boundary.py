"""What the server lets in, checked before gradio sees a request: the port it may listen on, failed logins per
client (a growing wait), and the size of the upload cache. Standard library only (the middleware is plain ASGI),
so `sdlora serve` checks its port before gradio is imported.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora.errors import SdloraError, UsageError

# Failed logins: FREE_TRIES from one client cost nothing; each later one locks that client out for twice as long
# as the last (1 s, 2 s, 4 s, ... up to MAX_LOCKOUT_S), until a login succeeds. 100 guesses then take hours.
FREE_TRIES = 5
MAX_LOCKOUT_S = 300.0
# The upload cache (gradio's uploads and the copies of files it serves) is cleaned every CACHE_CLEAN_S of files
# older than CACHE_AGE_S, wholly at every start; an upload that would take it over MAX_CACHE_BYTES is refused.
CACHE_CLEAN_S, CACHE_AGE_S = 600, 3600
MAX_CACHE_BYTES = 4 * 2**30  # 500 phone photos (the most one upload may hold) of 8 MB each


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port that is no port or that this host can't listen on (in use, needs root)."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: not a port; give one from 1 to 65535 (the default is 7860)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {host}: not an address of this machine ({exc}); give an IP, e.g. 127.0.0.1") from None
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is free
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SdloraError(port_in_use(host, port)) from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"--port {port}: needs root on this machine; choose a port above 1023") from None
        raise UsageError(f"--host {host} --port {port}: can't listen there ({exc.strerror}); check both") from None


def port_in_use(host: str, port: int) -> str:
    what = "stop it or choose another port with --port N"
    return f"--port {port}: already in use on {host} (another sdlora serve?); {what}"


def check_auth_file(path: Path) -> None:
    """Refuse an auth file that other users may read or write: its passwords would be theirs."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"--auth-file {path}: other users can read it (mode {stat.S_IMODE(mode):o}); chmod 600 {path}")


@dataclass
class Throttle:
    """Failed logins per client: `wait(client)` is how long it must wait before its next try."""

    free: int = FREE_TRIES
    cap: float = MAX_LOCKOUT_S
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)  # client: (count, time of the last)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, client: str) -> float:
        with self._lock:
            count, last = self._failures.get(client, (0, 0.0))
        if count < self.free:
            return 0.0
        return max(0.0, last + min(self.cap, 2.0 ** (count - self.free)) - self.clock())

    def record(self, client: str, ok: bool) -> None:
        with self._lock:
            if ok:
                self._failures.pop(client, None)
                return
            if len(self._failures) > 10_000:  # many clients: forget those whose lockout ended long ago
                old = self.clock() - 2 * self.cap
                self._failures = {key: value for key, value in self._failures.items() if value[1] > old}
            count, _ = self._failures.get(client, (0, 0.0))
            self._failures[client] = (count + 1, self.clock())


async def _refuse(send: Callable, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": message}).encode()
    extra = [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LoginThrottle:
    """ASGI middleware: a POST to .../login from a client inside its lockout gets 429 and Retry-After; the
    outcome of the others (200: logged in) feeds the client's count. The client is the connection's address (all
    users behind one reverse proxy share it: the proxy should limit logins too)."""

    def __init__(self, app: Any, throttle: Throttle | None = None) -> None:
        self.app, self.throttle = app, throttle or Throttle()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown",))[0]
        wait = self.throttle.wait(client)
        if wait > 0:
            seconds = int(wait) + 1
            message = f"too many failed logins from {client}: try again in {seconds} s"
            return await _refuse(send, 429, message, {"Retry-After": str(seconds)})
        status: list[int] = []

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, sending)
        self.throttle.record(client, ok=bool(status) and status[0] == 200)


def folder_bytes(folder: Path) -> int:
    total = 0
    for top, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                continue
    return total


def clean_cache(folder: Path, age: float = CACHE_AGE_S) -> int:
    """Remove what an earlier server left in the upload cache `folder` (files older than `age` seconds, then the
    folders they leave empty); gradio cleans only what its own process made. Returns the bytes freed."""
    freed, old = 0, time.time() - age
    for top, folders, names in os.walk(folder, topdown=False):
        for name in names:
            path = os.path.join(top, name)
            try:
                info = os.lstat(path)
                if info.st_mtime < old:
                    os.unlink(path)
                    freed += info.st_size
            except OSError:
                continue
        for name in folders:
            try:
                os.rmdir(os.path.join(top, name))  # only if empty
            except OSError:
                continue
    return freed


class UploadLimit:
    """ASGI middleware: an upload (POST .../upload) must say its size, and is refused (413) when it would take the
    upload cache `folder` over `limit` bytes. gradio's max_file_size bounds each file; this bounds them all."""

    def __init__(self, app: Any, folder: Path, limit: int = MAX_CACHE_BYTES) -> None:
        self.app, self.folder, self.limit = app, Path(folder), limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            size = int(headers[b"content-length"])
        except (KeyError, ValueError):
            return await _refuse(send, 411, "an upload must give its Content-Length")
        used = folder_bytes(self.folder)
        if used + size > self.limit:
            gb = self.limit / 2**30
            message = (
                f"the upload cache is full ({used / 2**30:.1f} of {gb:.0f} GB): files older than "
                f"{CACHE_AGE_S // 60} min are removed every {CACHE_CLEAN_S // 60} min, or restart the server"
            )
            return await _refuse(send, 413, message)
        await self.app(scope, receive, send)

"""`sdlora serve WORKSPACE`: the whole workflow as a local Gradio web app (optional extra `sdlora[ui]`).

Binds 127.0.0.1 unless told otherwise, and refuses any other host without a password; never makes a public share
link. It speaks plain HTTP: off localhost, put TLS in front (a reverse proxy, see the README); failed logins lock
the client out for longer each time (`boundary`). prep, train, generate and eval run as `sdlora` child processes,
so a crash never takes the server down and closing the page or restarting the server never stops a training run.
Importing this package imports no gradio.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import threading
from pathlib import Path

from sdlora.errors import SdloraError, UsageError
from sdlora.serve.boundary import check_auth_file, check_port, clean_cache

INSTALL_HINT = 'the web app needs the ui extra: pip install "sdlora[ui]"'


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credentials(host: str, auth: str | None, auth_file: Path | None) -> list[tuple[str, str]] | None:
    """The accounts that may log in (None: no login), checked before anything starts: a host other than the
    loopback needs --auth USER:PASSWORD or --auth-file FILE (one USER:PASSWORD per line)."""
    if auth and auth_file:
        raise UsageError("can't give both --auth and --auth-file; choose one")
    accounts = []
    if auth:
        accounts.append(_account(auth, "--auth"))
    if auth_file:
        try:
            lines = Path(auth_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"--auth-file {auth_file}: can't read it ({exc.strerror})") from None
        check_auth_file(Path(auth_file))
        accounts += [_account(line, f"--auth-file {auth_file}") for line in lines if line.strip() and line[0] != "#"]
        if not accounts:
            raise UsageError(f"--auth-file {auth_file}: no USER:PASSWORD line in it")
    if not accounts and not is_local(host):
        raise UsageError(
            f"--host {host} makes the app reachable from other machines: give --auth USER:PASSWORD or --auth-file "
            "FILE (or keep the default 127.0.0.1 and forward the port: ssh -L 7860:localhost:7860 HOST)"
        )
    return accounts or None


def _account(text: str, origin: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise UsageError(f"{origin}: expected USER:PASSWORD")
    return user, password


def serve(
    workspace: Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | None = None,
    auth_file: Path | None = None,
    models: Path | None = None,
) -> None:
    """Check the host, port and login, open the workspace (and the read-only `models` folder), then serve until
    interrupted."""
    accounts = credentials(host, auth, auth_file)
    if importlib.util.find_spec("gradio") is None:
        raise SdloraError(INSTALL_HINT)
    check_port(host, port)
    from sdlora.serve.jobs import Jobs
    from sdlora.serve.workspace import Workspace

    ws = Workspace.open(workspace, models)
    # Before gradio is imported (it reads these at import): its upload cache inside the workspace, no telemetry.
    os.environ["GRADIO_TEMP_DIR"] = str(ws.state / "cache")
    clean_cache(ws.state / "cache")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from sdlora.serve.app import build, launch

    jobs = Jobs(ws)
    _start_ticker(jobs)
    demo = build(ws, jobs)
    launch(demo, ws, host, port, accounts, Path(auth_file) if auth_file else None)


def _start_ticker(jobs, every: float = 2.0) -> threading.Thread:
    """Start queued runs when the running one ends, whether or not a page is open."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                jobs.tick()
            except Exception:  # noqa: BLE001 - a full disk or a bad record must not end the ticker
                continue

    thread = threading.Thread(target=loop, name="sdlora-jobs", daemon=True)
    thread.start()
    return thread

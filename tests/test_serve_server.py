"""`sdlora serve` as a running server, over HTTP (no browser): what it serves, the login and its lockout, the upload
cache limit, and a port it can't listen on."""

from __future__ import annotations

import socket
import time

import pytest
from serve_utils import get, start_server, stop_server
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.serve.boundary import MAX_CACHE_BYTES

pytestmark = pytest.mark.slow  # each starts a real server (3-4 s): outside the quick run's 3 minutes

runner = CliRunner()


def test_files_outside_the_data_folders_are_not_served(tmp_path):
    workspace = tmp_path / "ws"
    server, url = start_server(workspace)
    try:
        (workspace / ".sdlora-serve" / "jobs" / "x.json").write_text("{}")
        private = tmp_path / "private"
        private.mkdir()
        outside = private / "secret.png"
        outside.write_bytes(b"\x89PNG private-bytes")
        (workspace / "runs" / "out").symlink_to(private, target_is_directory=True)
        for path in (
            "/etc/passwd",
            f"{workspace}/.sdlora-serve/jobs/x.json",
            f"{workspace}/runs/../.sdlora-serve/jobs/x.json",
            f"{workspace}/runs/out/secret.png",
            str(outside),
        ):
            code, body = get(url + "gradio_api/file=" + path)
            assert code in (403, 404) and b"private-bytes" not in body, path
        for path in (
            "x/y/..%2F..%2F..%2F.sdlora-serve/jobs/x.json",
            "out/../eval/index.html",
            "..%2F..%2Fetc/x/passwd",
        ):
            assert get(url + "sdlora/report/" + path)[0] == 404, path
    finally:
        stop_server(server)


def test_a_login_is_required_with_auth_and_guessing_is_slowed(tmp_path):
    workspace = tmp_path / "ws"
    server, url = start_server(workspace, "--auth", "ann:secret")
    try:
        assert get(url + "config")[0] == 401
        assert get(url + "sdlora/report/r/s/index.html")[0] == 401
        assert get(url + "gradio_api/file=" + str(workspace / "runs"))[0] == 401
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        started = time.monotonic()
        codes = [get(url + "login", f"username=ann&password=guess{i}".encode(), form)[0] for i in range(100)]
        # 5 free tries, then a lockout: 100 guesses no longer take 0.4 s, they take hours.
        assert codes[:5] == [400] * 5 and set(codes[5:]) == {429}, codes
        assert get(url + "login", b"username=ann&password=secret", form)[0] == 429  # even the right one waits
        assert time.monotonic() - started < 60
    finally:
        stop_server(server)


def test_uploads_stop_when_the_cache_is_full(tmp_path):
    workspace = tmp_path / "ws"
    server, url = start_server(workspace)
    try:
        with (workspace / ".sdlora-serve" / "cache" / "filler").open("wb") as filler:
            filler.truncate(MAX_CACHE_BYTES)  # sparse: it takes no disk, its size counts
        body = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\njpeg\r\n--b--\r\n'
        code, answer = get(url + "gradio_api/upload", body, {"Content-Type": "multipart/form-data; boundary=b"})
        assert code == 413 and b"the upload cache is full" in answer
    finally:
        stop_server(server)


def test_a_port_in_use_or_out_of_range_ends_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", str(tmp_path / "ws"), "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: --port {port}: already in use on 127.0.0.1 (another sdlora serve?); stop it or choose another "
        "port with --port N"
    ]
    result = runner.invoke(app, ["serve", str(tmp_path / "ws"), "--port", "99999"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --port 99999: not a port; give one from 1 to 65535 (the default is 7860)"
    assert not (tmp_path / "ws").exists()  # refused before the workspace (or a server) was made

"""`sdlora generate --engine openai` against a local HTTP server that speaks the documented schema of
POST /v1/images/edits (multipart: image[], prompt, model, n, size; answer: data[].b64_json): no key, no network."""

from __future__ import annotations

import base64
import io
import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from typer.testing import CliRunner

from sdlora.cli import app

KEY = "sk-test-not-a-real-key"


def _png(colour: tuple[int, int, int], size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class EditServer:
    """A stand-in for the images edit endpoint. `mode` picks the answer: ok, refuse, ratelimit, badkey, malformed.
    Every request is kept (headers, fields, uploaded images) for the assertions."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                message = BytesParser(policy=HTTP).parsebytes(head + body)
                fields, images = {}, []
                for part in message.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    if name == "image[]":
                        images.append(part.get_payload(decode=True))
                    else:
                        fields[name] = part.get_payload(decode=True).decode()
                server.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "fields": fields, "images": images}
                )
                status, headers, answer = server.answer(fields)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, fields: dict) -> tuple[int, dict, bytes]:
        def error(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
            return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()

        if self.mode == "badkey":
            return 401, {}, error("Incorrect API key provided: sk-te***key.", "invalid_api_key")
        if self.mode == "ratelimit":
            return 429, {"Retry-After": "7"}, error("Rate limit reached for images per minute.", "rate_limit_exceeded")
        if self.mode == "refuse":
            message = "Your request was rejected as a result of our safety system."
            return 400, {}, error(message, "moderation_blocked", "image_generation_user_error")
        if self.mode == "malformed":
            return 200, {}, json.dumps({"created": 1, "data": [{"b64_json": "this is not base64!"}]}).encode()
        n = int(fields.get("n", 1))
        data = [{"b64_json": base64.b64encode(_png((40 * i, 90, 200))).decode()} for i in range(n)]
        return 200, {}, json.dumps({"created": 1, "data": data}).encode()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    running = EditServer()
    yield running
    running.close()


@pytest.fixture
def photo(tmp_path):
    """A reference photo with EXIF (a camera's, with a GPS tag) that must not be uploaded."""
    image = Image.new("RGB", (64, 64), (200, 150, 120))
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x8825] = {1: "N"}  # GPS IFD
    path = tmp_path / "me.jpg"
    image.save(path, exif=exif)
    return path


def _run(server, monkeypatch, args, *, mode="ok", key=KEY):
    server.mode = mode
    server.requests.clear()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    if key:
        monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    return CliRunner().invoke(app, ["generate", *args])


def test_success_writes_images_with_their_parameters(server, monkeypatch, photo, tmp_path):
    out = tmp_path / "out"
    second = tmp_path / "me-too.png"
    Image.new("RGB", (32, 48), (90, 60, 40)).save(second)
    args = [
        "--engine",
        "openai",
        "--reference",
        str(photo),
        "--reference",
        str(second),
        "--prompt",
        "a photo of the person on the moon",
    ]
    result = _run(server, monkeypatch, [*args, "--n", "3", "--size", "1024x1536", "--cfg", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 3 image(s)" in result.output
    (request,) = server.requests  # n=3 in one request
    assert request["path"] == "/v1/images/edits" and request["auth"] == f"Bearer {KEY}"
    assert request["fields"] == {
        "prompt": "a photo of the person on the moon",
        "model": "gpt-image-1",
        "n": "3",
        "size": "1024x1536",
    }
    upload, upload_2 = request["images"]  # each --reference photo, as image[]
    with Image.open(io.BytesIO(upload_2)) as sent:
        assert sent.size == (32, 48)
    with Image.open(io.BytesIO(upload)) as sent:
        assert sent.format == "PNG" and sent.size == (64, 64)
        assert not sent.getexif() and b"SecretCam" not in upload  # no EXIF left the machine
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["0000-42.png", "0001-43.png", "0002-44.png"]
    record = json.loads((out / "0001-43.json").read_text())
    assert record["engine"] == "openai" and record["api_model"] == "gpt-image-1" and record["seed"] is None
    assert [r["path"] for r in record["references"]] == [str(photo), str(second)]
    assert len(record["references"][0]["sha256"]) == 64
    assert record["ignored"] == ["cfg"]  # said, not silently dropped
    with Image.open(out / "0001-43.png") as image:
        assert "Engine: openai, Model: gpt-image-1" in image.text["parameters"]
    assert (out / "grid.png").is_file() and KEY not in (out / "config.json").read_text()


def test_nothing_is_sent_without_engine(server, monkeypatch, photo, tmp_path):
    result = _run(server, monkeypatch, ["--reference", str(photo), "--prompt", "p", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert server.requests == []


@pytest.mark.parametrize(
    ("mode", "key", "expected", "code"),
    [
        ("ok", None, "OPENAI_API_KEY is not set", 2),
        ("badkey", KEY, "refused the key (401 unauthorized: Incorrect API key provided", 1),
        ("ratelimit", KEY, "rate limited (429: Rate limit reached for images per minute.); the server asks to retry after 7 s", 1),  # noqa: E501
        ("refuse", KEY, "refused by the content policy (moderation_blocked: Your request was rejected", 1),
        ("malformed", KEY, "malformed response from", 1),
    ],
)  # fmt: skip
def test_failures_are_one_line(server, monkeypatch, photo, tmp_path, mode, key, expected, code):
    out = tmp_path / "out"
    args = ["--engine", "openai", "--reference", str(photo), "--prompt", "p", "--out", str(out)]
    result = _run(server, monkeypatch, args, mode=mode, key=key)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --engine openai: "), result.output
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert len(server.requests) == (0 if key is None else 1)  # a missing key fails before any upload
    assert not list(out.glob("0*.png"))


def test_local_only_options_are_refused_before_sending(server, monkeypatch, photo, tmp_path):
    args = ["--engine", "openai", "--reference", str(photo), "--prompt", "p", "--lora", str(photo)]
    result = _run(server, monkeypatch, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--lora needs a local model" in result.output
    args = ["--engine", "openai", "--reference", str(photo), "--prompt", "p", "--keep-face", str(photo)]
    result = _run(server, monkeypatch, [*args, "--out", str(tmp_path / "o")])  # a reference can't keep a face
    assert result.exit_code == 2 and "can't give reference with keep_face" in result.output
    result = _run(server, monkeypatch, ["--engine", "openai", "--prompt", "p", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs --reference" in result.output
    result = _run(server, monkeypatch, ["--engine", "nope", "--prompt", "p", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--engine 'nope'" in result.output
    assert server.requests == []

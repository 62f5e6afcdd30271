"""Serving the page: the eval-report route behind the login, the file and upload limits, gradio's launch."""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
from fastapi import Request  # module level: FastAPI resolves the route's annotations here
from starlette.middleware import Middleware

from sdlora.errors import SdloraError
from sdlora.serve.boundary import LoginThrottle, UploadLimit, port_in_use
from sdlora.serve.workspace import MAX_UPLOAD_BYTES, Workspace

REPORT_ROUTE = "/sdlora/report/"


def report_url(relative: str) -> str:
    """The page link of an eval report: runs/NAME/eval/STAMP/report/index.html -> /sdlora/report/NAME/STAMP/..."""
    parts = Path(relative).parts  # ("runs", NAME, "eval", STAMP, "report", ...)
    return REPORT_ROUTE + "/".join((parts[1], parts[3], *parts[5:]))


def report_route(ws: Workspace):
    """GET /sdlora/report/NAME/STAMP/FILE: eval reports (HTML and their images), behind the app's login, only
    from runs/NAME/eval/STAMP/report/ (no `..`, no symlink out)."""
    from fastapi.responses import FileResponse, PlainTextResponse
    from fastapi.routing import APIRoute

    def handler(run: str, stamp: str, path: str, request: Request):
        app = request.app
        if getattr(app, "auth", None) is not None:
            cookie = request.cookies.get(f"access-token-{app.cookie_id}") or request.cookies.get(
                f"access-token-unsecure-{app.cookie_id}"
            )
            if app.tokens.get(cookie) is None:
                return PlainTextResponse("log in first", status_code=401)
        try:
            relative = Path(path)
            if relative.is_absolute() or ".." in relative.parts or ".." in Path(stamp).parts:
                raise SdloraError("refused")
            folder = ws.inside(ws.path(run, "runs") / "eval" / stamp / "report", "runs")
            target = ws.inside(folder / relative, "runs")
            if folder not in target.parents or not target.is_file():
                raise SdloraError("not found")
        except SdloraError:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(target, headers={"X-Content-Type-Options": "nosniff"})

    return APIRoute(REPORT_ROUTE + "{run}/{stamp}/{path:path}", handler, methods=["GET"])


def launch(
    demo: gr.Blocks,
    ws: Workspace,
    host: str,
    port: int,
    accounts: list[tuple[str, str]] | None,
    auth_file: Path | None,
) -> None:
    """Serve the page. Files are served only from the workspace's data folders; never a share link."""
    logging.basicConfig(filename=ws.state / "server.log", level=logging.INFO)
    serveable = [ws.root / name for name in ("photos", "datasets", "runs", "images")] + [ws.state / "downloads"]
    blocked = [ws.state / "jobs", ws.state / "logs", ws.state / "server.log"]
    if auth_file is not None:
        blocked.append(auth_file.resolve())
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=host,
            server_port=port,
            share=False,
            auth=accounts,
            allowed_paths=[str(p) for p in serveable],
            blocked_paths=[str(p) for p in blocked],
            max_file_size=MAX_UPLOAD_BYTES,
            show_error=False,
            footer_links=[],
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
            theme=theme,
            quiet=True,  # gradio's own banner suggests share=True, which this app never allows
            prevent_thread_lock=True,
            app_kwargs={
                "routes": [report_route(ws)],
                "middleware": [Middleware(LoginThrottle), Middleware(UploadLimit, folder=ws.state / "cache")],
            },
        )
    except OSError as exc:  # taken since check_port looked (another server started in between)
        if "Cannot find empty port" not in str(exc):
            raise
        raise SdloraError(port_in_use(host, port)) from None
    print(banner(host, port, ws), flush=True)
    demo.block_thread()


def banner(host: str, port: int, ws: Workspace) -> str:
    """What `sdlora serve` prints once the page answers: where it is, and that runs outlive the server."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return (
        f"sdlora serve: the page is at http://{shown}:{port}/ (workspace {ws.root}). Ctrl-C stops the page; "
        "training runs go on and the next start finds them."
    )

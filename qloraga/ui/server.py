"""`qloraga ui`: the page on a local address.

Gradio serves the page (it brings the upload, plot, chat and streaming widgets); this module adds what a
training machine's page needs around it. It binds 127.0.0.1 unless told otherwise; any other `--host` needs
an access token (`--token`, or one generated and printed in the URL), and every request without it is
refused, API and files included (the first visit's `?token=` is kept in a cookie). On loopback, a request
whose Host is not a loopback name is refused too (a web page that rebinds its own name to 127.0.0.1 cannot
drive the page). Uploads are size-limited and kept inside the runs folder, which is also Gradio's cache:
Gradio serves no file from anywhere else.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket
import sys
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
COOKIE = "qloraga_token"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qloraga ui", description="a local web page to fine-tune, watch, compare, "
                                "chat with and export runs")
    p.add_argument("--runs", default="runs", help="the runs folder: where runs are written and found (default: runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                       "any other needs an access token)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    p.add_argument("--token", help="access token (default: generated when --host is not loopback)")
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest dataset upload, in MiB (default 512)")
    return p


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def access_token(host: str, token: str | None) -> str | None:
    """The token the page asks for: the one given, else a fresh one for any address but loopback."""
    return token or (None if is_loopback(host) else secrets.token_urlsafe(24))


def host_name(headers: dict[bytes, bytes]) -> str:
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0]


class Guard:
    """ASGI middleware in front of the whole app: the token (when one is set) and, on loopback, the Host."""

    def __init__(self, app, token: str | None, loopback: bool):
        self.app, self.token, self.loopback = app, token, loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.loopback and host_name(headers) not in LOOPBACK_NAMES:
            return await self.refuse(scope, send, 403, "refused: this page answers only to localhost / 127.0.0.1")
        if self.token is None:
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        bearer = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
        given = [t for t in (query, cookie[COOKIE].value if COOKIE in cookie else None, bearer) if t]
        if not any(secrets.compare_digest(t.encode(), self.token.encode()) for t in given):
            return await self.refuse(scope, send, 401, "refused: this page needs its access token: open the URL "
                                                       "`qloraga ui` printed (it ends in ?token=...)")
        if query is None or scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):  # keep the URL's token for the page's own requests
            if message["type"] == "http.response.start":
                value = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", value.encode())]}
            await send(message)
        return await self.app(scope, receive, send_with_cookie)

    @staticmethod
    async def refuse(scope, send, status: int, text: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = (text + "\n").encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def quiet_gradio(runs_root: Path) -> None:
    """Before gradio is imported: no analytics or update check (nothing leaves this machine), and its cache,
    where uploads land and the only files it serves, inside the runs folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ["GRADIO_TEMP_DIR"] = str(runs_root / ".ui" / "gradio")


def app(runs_root: str | os.PathLike, token: str | None = None, host: str = "127.0.0.1",
        max_upload_mb: float = 512):
    """The guarded ASGI app serving the page for `runs_root`."""
    from qloraga.ui.jobs import RunsFolder

    runs = RunsFolder(runs_root)
    quiet_gradio(runs.root)
    import gradio as gr
    from fastapi import FastAPI

    from qloraga.ui.page import CSS, build

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts to fetch
                              font_mono=["ui-monospace", "monospace"])
    page = build(runs)
    inner = gr.mount_gradio_app(FastAPI(), page.queue(), path="", footer_links=[], allowed_paths=[],
                                max_file_size=int(max_upload_mb * 2**20), ssr_mode=False, theme=theme, css=CSS,
                                mcp_server=False, pwa=False)
    return Guard(inner, token, is_loopback(host))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    loopback = is_loopback(args.host)
    token = access_token(args.host, args.token)
    try:
        import gradio  # noqa: F401
        import uvicorn
    except ImportError as exc:
        print(f"error: the page needs the ui extra ({exc.name} is missing): pip install 'qloraga[ui]'",
              file=sys.stderr)
        return 2
    asgi = app(args.runs, token, args.host, args.max_upload_mb)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host.strip("[]"), args.port))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port} ({exc.strerror}): choose another --port "
              "(0: any free one)", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"[qloraga] ui: http://{shown}:{port}/" + (f"?token={token}" if token else "")
          + f"  (runs folder: {Path(args.runs).resolve()}; Ctrl-C stops the page, not the runs)", flush=True)
    if not loopback:
        print("[qloraga] ui: reachable from other machines; requests without the token are refused", flush=True)
    uvicorn.Server(uvicorn.Config(asgi, log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the app is served: launch and queue options, request limits, and a job's view of its request.

Contracts:
- Served on 127.0.0.1 unless GRADIO_SERVER_NAME says otherwise; analytics and the /monitoring pages off;
  uploads capped at MAX_UPLOAD (refused before a byte reaches disk), other request bodies at MAX_BODY,
  cross-origin uploads refused; Gradio's temporary files deleted after an hour; per-session state
  kept for at most STATE_SESSIONS sessions (least recently used out).
- `event_alive()` (called in a handler's worker thread) returns a function that is False once the
  request's client cancelled or disconnected: long jobs poll it and stop, so no job outlives its client.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

MAX_UPLOAD = 64 * 1024 * 1024
MAX_BODY = 1024 * 1024  # API requests carry a few numbers and names: a 10 MB string is refused unread
STATE_SESSIONS = 256
DELETE_CACHE = (600, 3600)  # every 10 minutes, delete Gradio's temporary files older than an hour
QUEUE_OPTIONS = dict(default_concurrency_limit=2, max_size=64)
CSS = """
/* Phones: less padding, so plots keep their width and the readout stays close to the controls. */
@media (max-width: 700px) { .gradio-container { padding: 4px !important; } }
/* A job's status line carries its progress bar beside its buttons: room for the bar while the line is empty. */
#fisher-status, #fid-result { min-height: 3.2em; }
"""


LOOPBACK = ("127.0.0.1", "::1", "localhost")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ALLOWED_HOSTS = "LAFQ_ALLOWED_HOSTS"  # comma-separated Host names a loopback server also answers (a reverse proxy's)
API_PATH = re.compile(r"^/gradio_api/(call(?:/v2)?|run)/([^/]+)")  # /call/v2/<name>: the "Use via API" curl form


def port_from_env(environ=os.environ) -> int:
    text = environ.get("GRADIO_SERVER_PORT", "7860")
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ValueError(f"GRADIO_SERVER_PORT must be a port number in [1, 65535], got {text[:40]!r}")
    return port


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class RequestLimits:
    """ASGI middleware: refuse oversized bodies (413), bodies of unknown length (411), cross-origin uploads
    (403), a foreign Host on a loopback server (421) and unknown API names (404) with a one-line reason,
    before Gradio reads or stores anything."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.host_refusal(scope) or self.api_refusal(scope)
            if refusal is None and scope.get("method") == "POST":
                refusal = self.refusal(scope)
            if refusal is not None:
                code, text = refusal
                await send({"type": "http.response.start", "status": code,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": text.encode()})
                return
        await self.app(scope, receive, send)

    @staticmethod
    def host_refusal(scope) -> tuple[int, str] | None:
        """Served on a loopback address, only loopback names are answered: a page on another site that makes
        its own name resolve to 127.0.0.1 (DNS rebinding) sends its own name as Host."""
        server = scope.get("server") or ("", None)
        if server[0] not in LOOPBACK:
            return None
        host = (_header(scope, b"host") or "").strip()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        extra = {h.strip().lower() for h in os.environ.get(ALLOWED_HOSTS, "").split(",") if h.strip()}
        if name.lower() in LOOPBACK_NAMES or name.lower() in extra:
            return None
        return 421, (f"this server answers to localhost and 127.0.0.1 only (Host {host[:80]!r}); behind a reverse "
                     f"proxy that keeps the Host, name it in {ALLOWED_HOSTS}")

    @staticmethod
    def api_refusal(scope) -> tuple[int, str] | None:
        """An API name the app does not have: 404 and the names it has (Gradio answered HTTP 500)."""
        m = API_PATH.match(scope.get("path", ""))
        app = scope.get("app")
        if m is None or m.group(2) == "predict" or app is None or not hasattr(app, "get_blocks"):
            return None  # run/predict: the page's unqueued events (fn_index in the body)
        try:
            fns = [fn for fn in app.get_blocks().fns.values() if fn.api_name]
            callable_ = {fn.api_name for fn in fns if getattr(fn, "api_visibility", "public") != "private"}
            listed = {fn.api_name for fn in fns if getattr(fn, "api_visibility", "public") == "public"}
        except Exception:  # noqa: BLE001  (another Gradio's internals: let Gradio answer)
            return None
        if m.group(2) in callable_:
            return None
        return 404, f"no API named {m.group(2)[:40]!r}; this app has /" + ", /".join(sorted(listed))

    @staticmethod
    def refusal(scope) -> tuple[int, str] | None:
        upload = scope.get("path", "").rstrip("/").endswith("/upload")
        if upload:
            origin = _header(scope, b"origin")
            host = _header(scope, b"x-forwarded-host") or _header(scope, b"host")
            # "null" is the origin of a local file or a sandboxed frame: any page can send it, so it is no page of ours.
            if origin and (origin == "null" or urlsplit(origin).netloc != host):
                return 403, f"uploads are accepted from this app's own pages only (origin {origin[:80]})"
        limit = MAX_UPLOAD + 65536 if upload else MAX_BODY  # multipart framing adds a little
        length = _header(scope, b"content-length")
        if length is None:
            return (411, "requests need a Content-Length") if _header(scope, b"transfer-encoding") else None
        if not length.isdigit() or int(length) > limit:
            return 413, (f"request too large: {length[:20]} bytes; the limit is {limit:,} bytes"
                         + (f" (files up to {MAX_UPLOAD // 2**20} MiB)" if upload else ""))
        return None


class _LaunchOptions(Mapping):
    """demo.launch(**LAUNCH_OPTIONS). A Mapping that builds the dict afresh on every use: Gradio writes
    into app_kwargs (lifespan, response class), and a shared dict would chain one launch's into the next."""

    @staticmethod
    def build() -> dict:
        from starlette.middleware import Middleware

        from .plots import theme_js

        return dict(ssr_mode=False, show_error=True, enable_monitoring=False, max_file_size=MAX_UPLOAD,
                    state_session_capacity=STATE_SESSIONS, css=CSS, head=f"<script>{theme_js()}</script>",
                    app_kwargs={"middleware": [Middleware(RequestLimits)]})

    def __getitem__(self, key):
        return self.build()[key]

    def __iter__(self):
        return iter(self.build())

    def __len__(self):
        return len(self.build())


LAUNCH_OPTIONS = _LaunchOptions()


def event_alive():
    """In a handler: a function telling whether the current request is still wanted (None outside the queue).
    Gradio's /cancel and a lost client remove the event from the queue's active jobs or mark it dead,
    but the worker thread keeps running unless it looks."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return None

    def alive() -> bool:
        try:
            for events in list(queue.active_jobs):
                for evt in events or ():
                    if evt._id == event_id:
                        return bool(evt.alive)
        except (AttributeError, TypeError):  # another Gradio's internals: never cancel by mistake
            return True
        return False
    return alive

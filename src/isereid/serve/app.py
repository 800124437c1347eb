"""The FastAPI application of ``isereid serve`` and the server around it.

Routes (docs/serve.md): ``/`` the page, ``/static/*`` its assets (shipped in the package),
``/api/run``, ``/api/epochs``, ``/api/clusters``, ``/api/image/{id}``, ``/api/image/{id}/info``,
``POST /api/search``. Loopback mode accepts only loopback Host headers (no DNS rebinding); with a
token every request needs it (``?token=`` once, which sets a cookie, or ``Authorization: Bearer``).
"""
from __future__ import annotations

import secrets
import socket
from importlib import resources
from typing import Callable, Optional

from ..errors import InvalidArgument, IsereidError, MissingDependency, first_line
from .state import BadImage, NotFound, RunView

try:
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
except ImportError:  # pragma: no cover - the CLI reports it in one line
    FastAPI = None

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "isereid_token"


def _require_fastapi() -> None:
    if FastAPI is None:
        raise MissingDependency("isereid serve needs FastAPI and uvicorn: pip install 'isereid[serve]'")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def _host_name(header: str) -> str:
    """The host of a Host header value: ``[::1]:8000`` -> ``::1``, ``localhost:80`` -> ``localhost``."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def create_app(view: RunView, token: Optional[str] = None) -> FastAPI:
    """The application serving ``view``; with ``token`` every request must carry it (else 401),
    without one only requests addressed to a loopback host name are answered (else 403)."""
    _require_fastapi()
    app = FastAPI(title="isereid serve", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("isereid.serve") / "static"

    _add_guard(app, view, token)
    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def page():
        return Response((static / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/run")
    async def run_summary():
        return view.summary()

    @app.get("/api/epochs")
    async def epochs():
        return {"epochs": view.epochs}

    @app.get("/api/clusters")
    async def clusters(epoch: int, sort: str = "size", offset: int = 0, limit: Optional[int] = None,
                       outlier_offset: int = 0, outlier_limit: Optional[int] = None):
        return await run_in_threadpool(view.clusters, epoch, sort, offset, limit, outlier_offset, outlier_limit)

    @app.get("/api/image/{image_id}")
    async def image(image_id: int):
        path = view.image_path(image_id)
        if not path.is_file():
            raise NotFound(f"image {image_id} is no longer on disk")
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/image/{image_id}/info")
    async def image_info(image_id: int):
        return view.image_info(image_id)

    _add_search(app, view)
    return app


def _add_guard(app: FastAPI, view: RunView, token: Optional[str]) -> None:
    """Who gets in (token or loopback host) and how large an upload may be, before any route runs."""
    @app.middleware("http")
    async def guard(request: Request, call_next):
        set_cookie = False
        if token is None:
            if not is_loopback(_host_name(request.headers.get("host", ""))):
                return _error(403, "this server answers loopback addresses only")
        else:
            given = (request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
                     or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
            if not given or not secrets.compare_digest(given.encode(), token.encode()):
                return _error(401, "access token required: open the URL printed at start")
            set_cookie = request.query_params.get("token") is not None
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "uploads need a Content-Length")
            if not length.isdigit() or int(length) > view.max_upload_bytes + 64 * 1024:
                return _error(413, f"upload larger than {view.max_upload_bytes // (1 << 20)} MB")
        response = await call_next(request)
        if set_cookie:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response


def _validation_message(errors: list) -> str:
    """One line for FastAPI's parameter errors: ``bad parameter epoch: Input should be a valid integer ...``."""
    if not errors:
        return "bad request parameters"
    first = errors[0]
    where = ".".join(str(part) for part in tuple(first.get("loc", ()))[1:]) or "request"
    message = f"bad parameter {where}: {first_line(str(first.get('msg', 'invalid value')))}"
    return message if len(errors) == 1 else f"{message} (and {len(errors) - 1} more)"


def _add_error_handlers(app: FastAPI) -> None:
    """Library errors as one-line JSON answers: NotFound 404, the other IsereidErrors 400, and a path or query
    parameter of the wrong type 400 as well (FastAPI's own answer would be a 422 with a list of errors)."""
    @app.exception_handler(NotFound)
    async def not_found(request, exc):
        return _error(404, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, exc):
        return _error(400, _validation_message(exc.errors()))

    @app.exception_handler(IsereidError)
    async def bad_request(request, exc):  # BadImage, InvalidArgument
        return _error(400, first_line(exc))


def _add_search(app: FastAPI, view: RunView) -> None:
    """``POST /api/search``: an uploaded crop (field ``image``) or a known one (``image_id``)."""
    @app.post("/api/search")
    async def search(request: Request, topk: int = Query(10), other_cameras_only: bool = Query(False)):
        form = await request.form(max_files=1, max_fields=8)
        try:
            topk = int(form.get("topk", topk))
            flag = str(form.get("other_cameras_only", other_cameras_only)).lower()
            other = flag in ("1", "true", "on", "yes")
            upload = form.get("image")
            image_id = form.get("image_id")
            if upload is not None and not isinstance(upload, str):
                data = await upload.read(view.max_upload_bytes + 1)
                if len(data) > view.max_upload_bytes:
                    return _error(413, f"upload larger than {view.max_upload_bytes // (1 << 20)} MB")
                picture = await run_in_threadpool(view.decode_upload, data)
                return await run_in_threadpool(lambda: view.search(image=picture, filename=upload.filename or "",
                                                                   topk=topk, other_cameras_only=other))
            if image_id is None:
                raise InvalidArgument("give an image file (field image) or an image_id")
            try:
                image_id = int(str(image_id))
            except ValueError:
                raise InvalidArgument(f"image_id must be an integer, not {str(image_id)[:40]!r}") from None
            return await run_in_threadpool(lambda: view.search(image_id=image_id, topk=topk,
                                                               other_cameras_only=other))
        except ValueError as e:
            if isinstance(e, IsereidError):
                raise
            raise BadImage(f"bad search parameter ({first_line(e)})") from None
        finally:
            await form.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); IsereidError when that fails."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise IsereidError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        reason = "the port is in use" if e.errno in (98, 48, 10048) else e.strerror or str(e)
        raise IsereidError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


class Server:
    """A bound, not yet running server: :attr:`url` is known (the actual port for port 0) before
    :meth:`run` blocks; :meth:`stop` ends it from another thread."""

    def __init__(self, sock: socket.socket, host: str, token: Optional[str]):
        self.sock, self.host, self.token = sock, host, token
        self.port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/" + (f"?token={token}" if token else "")
        self._server = None

    def run(self, view: RunView) -> None:
        import uvicorn

        app = create_app(view, self.token)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True


def listen(host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
           say: Callable[[str], None] = print) -> Server:
    """Bind ``host:port`` first (a port in use fails at once, before the run is loaded). Any host
    that is not loopback gets an access token (``token`` or a generated one) and a warning line."""
    _require_fastapi()
    if not is_loopback(host) and token is None:
        token = secrets.token_urlsafe(18)
    server = Server(bind(host, port), host, token)
    if not is_loopback(host):
        say(f"warning: listening on {host}: the crops become visible to that network (access token required)")
    return server

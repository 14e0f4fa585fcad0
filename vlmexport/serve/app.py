"""The Starlette application of `vlmexport serve`.

    GET  /                       web/demo.html
    GET  /web/<file>             web/*.js, *.css (prefix_vlm.js and its modules)
    GET  /vendor/onnxruntime-web/<file>, /vendor/tokenizers/<file>
                                 the pinned npm packages' dist files from web/node_modules
    GET  /bundle/<file>          vlmexport.json and the files it lists, nothing else (ETag, Range)
    GET  /health                 status, variants, pool and queue
    GET  /openapi.json, /docs    the API described (OpenAPI 3.1) and as a page
    POST /caption                an image (multipart field `image`, or a raw image body) →
                                 {"caption", "tokens", "variant", "seconds"}; decoding fields in
                                 the form or the query (see fields.py)

Nothing is fetched from a CDN: the page imports ONNX Runtime Web and the tokenizer from
/vendor through an import map, so it works offline once served. Every response carries
Cross-Origin-Opener-Policy/Embedder-Policy/Resource-Policy, so the page is cross-origin
isolated and ONNX Runtime Web may use threads (SharedArrayBuffer) if asked.
"""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmexport.bundle.manifest import MANIFEST_NAME, read_manifest
from vlmexport.errors import BundleError, ImageError, VlmExportError
from vlmexport.serve.docs import docs_page, openapi_schema
from vlmexport.serve.fields import FIELDS, FieldError, parse_fields
from vlmexport.serve.hosts import HostPolicy
from vlmexport.serve.images import read_header
from vlmexport.serve.problems import RequestError
from vlmexport.serve.service import CaptionService

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
NODE_MODULES = WEB_DIR / "node_modules"
VENDOR = {
    "/vendor/onnxruntime-web/": NODE_MODULES / "onnxruntime-web" / "dist",
    "/vendor/tokenizers/": NODE_MODULES / "@huggingface" / "tokenizers" / "dist",
}
# Explicit, not the platform's mimetypes database: browsers refuse module scripts not served as
# JavaScript, and WebAssembly.instantiateStreaming needs application/wasm.
MIME = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".map": "application/json",
    ".onnx": "application/octet-stream",
    ".onnx_data": "application/octet-stream",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
}
HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    # Revalidate every time (ETag → 304): a re-exported bundle is never stale.
    "Cache-Control": "no-cache",
}
RAW_TYPES = ("image/", "application/octet-stream")


def create_app(service: CaptionService, hosts: HostPolicy, log: Callable[[str], None]) -> ASGIApp:
    """The ASGI app: routes, then the guard (Host, Origin, headers, access log) around them."""

    async def caption(request: Request) -> Response:
        started, settings = time.perf_counter(), service.settings
        try:
            data, fields = await _upload(request, settings.max_upload_bytes, settings.client_timeout, settings.parse_timeout)
            read_header(data, settings.max_pixels)  # 413 for too many pixels before any pool slot or decode
            variant, options = parse_fields(fields, service.limits)
            result = await service.submit(data, variant, options)
        except RequestError as exc:
            return problem(exc.status, exc.problem, exc.fix, exc.headers)
        except FieldError as exc:
            return problem(HTTPStatus.BAD_REQUEST, exc.problem, exc.fix, field=exc.field)
        except ImageError:
            return problem(HTTPStatus.BAD_REQUEST, "the upload is not a readable image", "send a PNG, JPEG or other image file")
        except VlmExportError as exc:  # BundleError: a variant the bundle lacks
            return problem(HTTPStatus.BAD_REQUEST, exc.problem, exc.fix)
        seconds = round(time.perf_counter() - started, 4)
        return JSONResponse({"caption": result.text, "tokens": result.tokens, "variant": variant, "seconds": seconds})

    async def health(request: Request) -> Response:
        try:
            variants = sorted(read_manifest(service.onnx_dir).variants)
        except BundleError as exc:
            return problem(HTTPStatus.SERVICE_UNAVAILABLE, exc.problem, exc.fix)
        return JSONResponse({
            "status": "ok", "variants": variants, "open": sorted(service.captioners), "workers": service.workers,
            "pending": service.pending, "capacity": service.capacity, "max_new_tokens": service.limits.max_new_tokens,
            "max_beams": service.limits.max_beams,
        })  # fmt: skip

    schema = openapi_schema(service.limits, service.settings)

    async def openapi(request: Request) -> Response:
        return JSONResponse(schema)

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_page(schema))

    def wrong_method(request: Request, allowed: list[str]) -> Response:
        """An endpoint asked with another method: 405 and the methods it takes (RFC 9110 §15.5.6)."""
        how = "POST an image to /caption" if "POST" in allowed else f"use {' or '.join(allowed)} {request.url.path}"
        return problem(HTTPStatus.METHOD_NOT_ALLOWED, f"{request.url.path} does not take {request.method}", how, headers={"Allow": ", ".join(allowed)})

    async def static(request: Request) -> Response:
        if request.url.path in endpoints:  # a method the catch-all route takes (GET /caption)
            return wrong_method(request, endpoints[request.url.path])
        if request.method not in ("GET", "HEAD"):
            return problem(HTTPStatus.NOT_FOUND, f"no {request.method} endpoint {_printable(request.url.path)[:200]}", "POST images to /caption")
        found = static_file(request.url.path, service.onnx_dir)
        stat = _stat(found)
        if found is None or stat is None:
            return problem(HTTPStatus.NOT_FOUND, f"nothing is served at {_printable(request.url.path)[:200]}", "see GET /docs")
        media_type = MIME.get(found.suffix.lower()) or mimetypes.guess_type(found.name)[0] or "application/octet-stream"
        response = FileResponse(found, stat_result=stat, media_type=media_type)
        # FileResponse sends ETag and serves Range, but leaves If-None-Match to the caller.
        if response.headers["etag"] in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=HTTPStatus.NOT_MODIFIED, headers={"ETag": response.headers["etag"]})
        return response

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == HTTPStatus.METHOD_NOT_ALLOWED and request.url.path in endpoints:  # a method no route takes (OPTIONS /caption)
            return wrong_method(request, endpoints[request.url.path])
        fix = "POST images to /caption" if request.method == "POST" else "see GET /docs"
        return problem(HTTPStatus(status), f"no {request.method} endpoint {_printable(request.url.path)[:200]}", fix)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette's outermost middleware sends this, then re-raises to Guard, which logs it.
        return problem(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({exc.__class__.__name__})", "see the server's log")

    routes = [
        Route("/caption", caption, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/{path:path}", static, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),  # files, or a 404 naming the method
    ]
    # Starlette's router sends a path whose route lacks the method on to the next route that
    # matches it (the catch-all below), which would answer 404: `static` answers 405 for these.
    endpoints = {route.path: sorted(route.methods or ()) for route in routes if route.path != "/{path:path}"}
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal_error})
    return Guard(app, hosts, log)


async def _upload(request: Request, max_bytes: int, timeout: float, parse_timeout: float) -> tuple[bytes, dict[str, str]]:
    """(image bytes, fields) of a POST: the body refused unread when absent or too large, read
    within `timeout`; a multipart form parsed as it arrives, under field and part limits and
    `parse_timeout` seconds of parsing.

    Raises:
        RequestError: 411, 413, 408, 415 or 400, naming the problem.
    """
    close = {"Connection": "close"}  # the body may be unread: it must not be parsed as the next request
    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        raise RequestError(HTTPStatus.LENGTH_REQUIRED, "chunked uploads are not accepted", "send a Content-Length", close)
    length_header = request.headers.get("content-length", "")
    if not length_header.isdigit():
        raise RequestError(HTTPStatus.LENGTH_REQUIRED, "no Content-Length", "send the image with a Content-Length header", close)
    if int(length_header) > max_bytes:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload of {int(length_header)} bytes is over the {max_bytes / 1e6:g} MB limit", "send a smaller image", close
        )
    fields = {key: value for key, value in request.query_params.items()}
    content_type = request.headers.get("content-type", "").lower()
    if content_type and not content_type.startswith(("multipart/form-data", *RAW_TYPES)):
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Type {_printable(content_type)[:60]} is not an image", "send multipart/form-data or image/*", close)
    try:
        with anyio.fail_after(timeout):
            if content_type.startswith("multipart/form-data"):
                return await _form(request, fields, parse_timeout)
            body = await request.body()
    except TimeoutError:
        raise RequestError(HTTPStatus.REQUEST_TIMEOUT, f"the upload took over {timeout:g} s", "send the request at once", close) from None
    if not body:
        raise RequestError(HTTPStatus.BAD_REQUEST, "empty body", "POST an image file (multipart field `image`, or the raw bytes)")
    return body, fields


async def _form(request: Request, fields: dict[str, str], parse_timeout: float) -> tuple[bytes, dict[str, str]]:
    """The image and fields of a multipart form, parsed chunk by chunk as the body arrives (a file
    part goes to disk past 1 MB: a 19 MB part costs no 19 MB copies before its bytes are read)."""
    fix = "send one file field `image` and the documented fields"
    # One file, the known fields (and a few to spare, so a typo is named, not counted), small parts.
    parser = MultiPartParser(request.headers, _parse_budget(request.stream(), parse_timeout), max_files=1, max_fields=len(FIELDS) + 4, max_part_size=4096)
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # python-multipart's limits, as Starlette words them (no field names)
        raise RequestError(HTTPStatus.BAD_REQUEST, f"bad multipart form: {exc.message}", fix, {"Connection": "close"}) from None  # the rest is unread
    image = None
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == "image" or image is None:
                    image = await value.read()
            elif name == "image":
                raise RequestError(HTTPStatus.BAD_REQUEST, "the field `image` is text, not a file", "send the file as an upload (curl -F image=@photo.png)")
            else:
                fields[name] = value
    finally:
        await form.close()  # every spooled file part, on every path
    if image is None:
        raise RequestError(HTTPStatus.BAD_REQUEST, "no image in the form", "send the file in a multipart field named `image`")
    return image, fields


async def _parse_budget(stream: AsyncIterator[bytes], seconds: float) -> AsyncGenerator[bytes, None]:
    """The body's chunks, timing the parser's work on each (from a chunk handed over to the next
    one asked for): past `seconds` in all, a 400. Waiting for the network is not counted."""
    spent = 0.0
    async for chunk in stream:
        handed = time.perf_counter()
        yield chunk
        spent += time.perf_counter() - handed
        if spent > seconds:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the form took over {seconds:g} s to parse", "send one file field `image` and the documented fields", {"Connection": "close"})


def problem(status: HTTPStatus, message: str, fix: str | None = None, headers: dict[str, str] | None = None, field: str | None = None) -> JSONResponse:
    """The JSON error every refusal uses: {"error", "fix", "field"?}."""
    body: dict[str, Any] = {"error": message, **({"fix": fix} if fix else {}), **({"field": field} if field else {})}
    return JSONResponse(body, status_code=int(status), headers=headers)


def static_file(path: str, onnx_dir: Path) -> Path | None:
    """The file a GET may read, or None (→ 404): the demo page, top-level page scripts, the
    vendored packages' dist files, and the bundle's manifest and the files it lists."""
    if path in ("/", "/index.html", "/demo.html"):
        return WEB_DIR / "demo.html"
    if path.startswith("/web/"):
        name = path.removeprefix("/web/")
        # Top-level page files only: never node_modules, tests or install scripts.
        return _inside(WEB_DIR, name) if "/" not in name and Path(name).suffix in (".js", ".css", ".html") else None
    if path.startswith("/bundle/"):
        name = path.removeprefix("/bundle/")
        try:  # read per request: a file a later quantize adds is served without a restart
            listed = name == MANIFEST_NAME or name in read_manifest(onnx_dir).files
        except BundleError:
            return None
        return _inside(onnx_dir, name) if listed else None
    for prefix, root in VENDOR.items():
        if path.startswith(prefix):
            name = path.removeprefix(prefix)
            return _inside(root, name) if Path(name).suffix in (".mjs", ".js", ".wasm", ".map") else None
    return None


def _inside(root: Path, name: str) -> Path | None:
    """root/name if it is a file under root (no `..` or symlink escapes)."""
    try:
        path = (root / name).resolve()
    except (OSError, ValueError):
        return None
    return path if path.is_file() and path.is_relative_to(root.resolve()) else None


def _stat(path: Path | None) -> os.stat_result | None:
    try:
        return path.stat() if path is not None else None
    except OSError:  # removed since it was found
        return None


def _printable(text: str) -> str:
    """Text safe for a log line or an answer: control and non-ASCII characters as escapes."""
    return "".join(c if " " <= c < "\x7f" else c.encode("unicode_escape").decode("ascii") for c in text)


class Guard:
    """Around every request: the Host and Origin checks, the isolation headers on every answer
    (errors included), a JSON 500 for a bug, and one escaped access-log line.

    Starlette's TrustedHostMiddleware checks Host but answers in plain text, knows no Origin
    check, and its headers would not reach answers made outside it; these few lines do all three.
    """

    def __init__(self, app: ASGIApp, hosts: HostPolicy, log: Callable[[str], None]) -> None:
        self.app, self.hosts, self.log = app, hosts, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [0]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
                # The server's own time to answer, apart from the network and the client (browsers show it).
                headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1e3:.1f}"
            await send(message)

        refusal = self.hosts.refusal(_headers(scope["headers"]), scope["method"])
        try:
            app: Callable[[Scope, Receive, Send], Awaitable[None]] = problem(HTTPStatus.FORBIDDEN, *refusal) if refusal else self.app
            await app(scope, receive, send_with_headers)
        except Exception as exc:  # a bug must not stop the server: answer 500 (if nothing was sent yet) and go on
            self.log(f"error in {scope['method']} {_printable(scope['path'])[:200]}: {exc!r}")
            if not status[0]:
                await problem(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({exc.__class__.__name__})", "see the server's log")(scope, receive, send_with_headers)
        finally:
            client = scope.get("client") or ("-", 0)
            target = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
            elapsed = (time.perf_counter() - started) * 1e3
            self.log(f'{client[0]} "{scope["method"]} {_printable(target)[:300]}" {status[0]} {elapsed:.0f} ms')


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}


"""An HTTP server (standard library only) for the browser demo and a Python caption endpoint.

    GET  /                       web/demo.html
    GET  /web/<file>             web/*.js, *.css (prefix_vlm.js and its modules)
    GET  /vendor/onnxruntime-web/<file>, /vendor/tokenizers/<file>
                                 the pinned npm packages' dist files from web/node_modules
    GET  /bundle/<file>          vlmexport.json and the files it lists, nothing else
    POST /caption                an image (multipart field `image`, or a raw image body) →
                                 {"caption", "tokens", "variant", "seconds"}; optional fields or
                                 query parameters: variant, max_new_tokens, num_beams, do_sample,
                                 temperature, top_k, top_p, seed

Nothing is fetched from a CDN: the page imports ONNX Runtime Web and the tokenizer from
/vendor through an import map, so it works offline once served. Every response carries
Cross-Origin-Opener-Policy/Embedder-Policy, so the page is cross-origin isolated and ONNX
Runtime Web may use threads (SharedArrayBuffer) if asked; the demo runs single-threaded.
"""

from __future__ import annotations

import json
import mimetypes
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.manifest import MANIFEST_NAME, read_manifest
from vlmexport.bundle.preprocess import bundle_preprocessor, open_image
from vlmexport.bundle.tokenizer import decode, load_tokenizer
from vlmexport.errors import BundleError, ImageError, UsageError, VlmExportError
from vlmexport.runtime.bundle import Bundle, open_bundle
from vlmexport.runtime.caption import caption_tokens

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
NODE_MODULES = WEB_DIR / "node_modules"
VENDOR = {
    "/vendor/onnxruntime-web/": NODE_MODULES / "onnxruntime-web" / "dist",
    "/vendor/tokenizers/": NODE_MODULES / "@huggingface" / "tokenizers" / "dist",
}
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
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
# (name, parser) of the decoding fields POST /caption accepts.
DECODE_FIELDS: dict[str, Callable[[str], Any]] = {
    "max_new_tokens": int,
    "num_beams": int,
    "do_sample": lambda v: v.lower() in ("1", "true", "yes", "on"),
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
}


class RequestError(Exception):
    """A bad request: answered with `status` and a JSON error, the server goes on."""

    def __init__(self, status: HTTPStatus, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.status, self.problem, self.fix = status, problem, fix


@dataclass
class CaptionService:
    """The Python runtime behind POST /caption: each variant's sessions are opened on first use
    and kept; the tokenizer and preprocessing are read once."""

    onnx_dir: Path
    bundles: dict[str, Bundle] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.preprocessor = bundle_preprocessor(self.onnx_dir)
        self.tokenizer = load_tokenizer(self.onnx_dir)

    def bundle(self, variant: str) -> Bundle:
        """Raises: BundleError for a variant the bundle does not have."""
        with self.lock:  # concurrent first requests open a variant once
            if variant not in self.bundles:
                self.bundles[variant] = open_bundle(self.onnx_dir, variant)
            return self.bundles[variant]

    def caption(self, image_path: Path, variant: str, options: DecodeOptions) -> tuple[str, list[int]]:
        """Raises: ImageError (not an image), BundleError (variant)."""
        pixels = self.preprocessor([open_image(image_path)])
        tokens = caption_tokens(self.bundle(variant), pixels, options)
        return decode(self.tokenizer, tokens)[0], tokens[0]


class VlmServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its bundle, caption service and limits."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: CaptionService, max_upload_bytes: int, log: Callable[[str], None]) -> None:
        super().__init__(address, Handler)
        self.service = service
        self.onnx_dir = service.onnx_dir
        self.max_upload_bytes = max_upload_bytes
        self.log = log
        self.warnings: list[str] = []

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}"


def make_server(
    onnx_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    log: Callable[[str], None] = lambda line: None,
) -> VlmServer:
    """A server for the bundle in `onnx_dir`, bound and ready for `serve_forever()`; port 0 picks
    a free port (see `server.url`). `server.warnings` lists what the demo page will lack.

    Raises:
        BundleError: no bundle (or no manifest) in `onnx_dir`.
        CheckpointError: the bundle's tokenizer or preprocessing file is unreadable.
        UsageError: the address cannot be listened on.
    """
    onnx_dir = Path(onnx_dir)
    read_manifest(onnx_dir)
    service = CaptionService(onnx_dir)
    try:
        server = VlmServer((host, port), service, max_upload_bytes, log)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", "pick another --port (0 picks a free one) or --host") from exc
    if not (WEB_DIR / "demo.html").is_file():
        server.warnings.append(f"{WEB_DIR} is missing: the demo page needs a source checkout of vlmexport (POST /caption works)")
    elif not all(root.is_dir() for root in VENDOR.values()):
        server.warnings.append(f"{NODE_MODULES} lacks onnxruntime-web or @huggingface/tokenizers: run web/install-deps.sh (or `npm ci` in web/) for the demo page")
    return server


class Handler(SimpleHTTPRequestHandler):
    """Static files from fixed roots (no listings, nothing outside them) and POST /caption."""

    server: VlmServer
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME}
    protocol_version = "HTTP/1.1"

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("X-Content-Type-Options", "nosniff")
        # Revalidate every time (Last-Modified → 304): a re-exported bundle is never stale.
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.address_string()} {format % args}")

    def guess_type(self, path: str | Path) -> str:
        suffix = Path(path).suffix.lower()
        return MIME.get(suffix) or mimetypes.guess_type(str(path))[0] or "application/octet-stream"

    def translate_path(self, path: str) -> str:
        """The file a GET may read, or a path that does not exist (→ 404)."""
        found = self.static_file(unquote(urlsplit(path).path))
        return str(found) if found else "/nonexistent/vlmexport-serve"

    def static_file(self, path: str) -> Path | None:
        if path in ("/", "/index.html", "/demo.html"):
            return WEB_DIR / "demo.html"
        if path.startswith("/web/"):
            name = path.removeprefix("/web/")
            # Top-level page files only: never node_modules, tests or install scripts.
            return _inside(WEB_DIR, name) if "/" not in name and Path(name).suffix in (".js", ".css", ".html") else None
        if path.startswith("/bundle/"):
            name = path.removeprefix("/bundle/")
            try:
                listed = name == MANIFEST_NAME or name in read_manifest(self.server.onnx_dir).files
            except BundleError:
                return None
            return _inside(self.server.onnx_dir, name) if listed else None
        for prefix, root in VENDOR.items():
            if path.startswith(prefix):
                name = path.removeprefix(prefix)
                return _inside(root, name) if Path(name).suffix in (".mjs", ".js", ".wasm", ".map") else None
        return None

    def list_directory(self, path: str | Path) -> None:
        self.send_error(HTTPStatus.NOT_FOUND, "no directory listings")
        return None

    def do_POST(self) -> None:
        started = time.perf_counter()
        try:
            if urlsplit(self.path).path != "/caption":
                raise RequestError(HTTPStatus.NOT_FOUND, f"no POST endpoint {urlsplit(self.path).path}", "POST images to /caption")
            body = self.read_body()
            image, fields = self.image_and_fields(body)
            variant, options = parse_fields(fields)
            with tempfile.NamedTemporaryFile(prefix="vlmexport-upload-") as upload:
                upload.write(image)
                upload.flush()
                caption, tokens = self.server.service.caption(Path(upload.name), variant, options)
            self.send_json(HTTPStatus.OK, {"caption": caption, "tokens": tokens, "variant": variant, "seconds": round(time.perf_counter() - started, 4)})
        except RequestError as exc:
            # The body may be unread: close rather than parse it as the next request.
            self.close_connection = True
            self.send_json(exc.status, {"error": exc.problem, **({"fix": exc.fix} if exc.fix else {})})
        except ImageError:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": "the upload is not a readable image", "fix": "send a PNG, JPEG or other image file"})
        except VlmExportError as exc:  # UsageError (options), BundleError (variant)
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": exc.problem, **({"fix": exc.fix} if exc.fix else {})})
        except Exception as exc:  # a bug must not stop the server: answer 500 and go on
            self.server.log(f"error in POST /caption: {exc!r}")
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({exc.__class__.__name__})", "fix": "see the server's log"})

    def read_body(self) -> bytes:
        """The request body, refused before reading when it is absent or over the limit."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "chunked uploads are not accepted", "send a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "no Content-Length", "send the image with a Content-Length header") from None
        if length < 0 or length > self.server.max_upload_bytes:
            limit = self.server.max_upload_bytes / 1e6
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload of {length} bytes is over the {limit:g} MB limit", "send a smaller image")
        body = self.rfile.read(length)
        if len(body) != length:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the upload ended early", "send the whole image")
        return body

    def image_and_fields(self, body: bytes) -> tuple[bytes, dict[str, str]]:
        """Image bytes and decoding fields from a multipart form or a raw body, plus the query."""
        fields = {key: values[-1] for key, values in parse_qs(urlsplit(self.path).query).items()}
        content_type = self.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            if not body:
                raise RequestError(HTTPStatus.BAD_REQUEST, "empty body", "POST an image file (multipart field `image`, or the raw bytes)")
            return body, fields
        form = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        image = None
        for part in form.iter_parts() if form.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if name == "image" or (image is None and part.get_filename()):
                image = payload
            elif name:
                fields[name] = payload.decode("utf-8", "replace")
        if image is None:
            raise RequestError(HTTPStatus.BAD_REQUEST, "no image in the form", "send the file in a multipart field named `image`")
        return image, fields

    def send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def parse_fields(fields: dict[str, str]) -> tuple[str, DecodeOptions]:
    """(variant, decoding options) from form fields or query parameters.

    Raises:
        RequestError: an unknown field or a value of the wrong type.
        UsageError: a value DecodeOptions rejects.
    """
    unknown = sorted(set(fields) - set(DECODE_FIELDS) - {"variant"})
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {', '.join(unknown)}", f"use variant, {', '.join(DECODE_FIELDS)}")
    values: dict[str, Any] = {}
    for name, parse in DECODE_FIELDS.items():
        if name in fields:
            try:
                values[name] = parse(fields[name])
            except ValueError:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}={fields[name]!r} is not a number", f"send {name} as a number") from None
    return fields.get("variant", "fp32"), DecodeOptions(**values)


def _inside(root: Path, name: str) -> Path | None:
    """root/name if it is a file under root (no `..` or symlink escapes)."""
    try:
        path = (root / name).resolve()
    except (OSError, ValueError):
        return None
    return path if path.is_file() and path.is_relative_to(root.resolve()) else None

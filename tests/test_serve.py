"""`vlmexport serve`: POST /caption gives the Python runtime's caption, bad requests get a 4xx with a
JSON error and the server goes on serving; static files come only from their roots, with the
MIME types and cross-origin headers ONNX Runtime Web needs."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import require, running_server

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.manifest import read_manifest
from vlmexport.cli import main
from vlmexport.errors import BundleError, ImageError, UsageError
from vlmexport.exporter.export import export_bundle
from vlmexport.runtime import Captioner
from vlmexport.runtime.caption import caption_images
from vlmexport.samples import sample_images
from vlmexport.serve.app import _parse_budget
from vlmexport.serve.hosts import host_policy
from vlmexport.serve.load import multipart
from vlmexport.serve.problems import RequestError
from vlmexport.serve.server import VENDOR, Settings, VlmServer, make_server


@pytest.fixture(scope="module")
def bundle(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "onnx"
    export_bundle(make_checkpoint("serve"), out, layout="distilvit", verify=False)
    (out / "notes.txt").write_text("a file in the bundle folder that the manifest does not list")
    return out


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[VlmServer]:
    with running_server(bundle) as running:
        yield running


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("serve-images")
    paths = []
    for i, image in enumerate(sample_images(3, 48, seed=5)):
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
    return paths


def request(server: VlmServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def post_caption(server: VlmServer, image: bytes, path: str = "/caption", **fields: str) -> tuple[int, dict]:
    body, headers = multipart(fields, {"image": ("photo.png", image)})
    status, _, data = request(server, "POST", path, body, headers)
    return status, json.loads(data)


def test_caption_equals_the_python_runtime_for_form_and_raw_uploads(server: VlmServer, bundle: Path, images: list[Path]) -> None:
    expected = caption_images(bundle, images, batch_size=1)
    assert len(set(expected)) > 1  # the images get different captions, so a mix-up would show
    for path, caption in zip(images, expected):
        status, body = post_caption(server, path.read_bytes())
        assert status == 200 and body["caption"] == caption and body["variant"] == "fp32"
        assert isinstance(body["tokens"], list) and body["seconds"] > 0
    status, _, data = request(server, "POST", "/caption", images[0].read_bytes(), {"Content-Type": "image/png"})
    assert status == 200 and json.loads(data)["caption"] == expected[0]


def test_decoding_fields_in_the_form_or_query_reach_the_runtime(server: VlmServer, bundle: Path, images: list[Path]) -> None:
    beams = caption_images(bundle, images[:1], options=DecodeOptions(num_beams=3, max_new_tokens=5))[0]
    assert post_caption(server, images[0].read_bytes(), num_beams="3", max_new_tokens="5")[1]["caption"] == beams
    assert post_caption(server, images[0].read_bytes(), path="/caption?num_beams=3&max_new_tokens=5")[1]["caption"] == beams
    sampled = [post_caption(server, images[0].read_bytes(), do_sample="true", seed="4", temperature="2")[1]["caption"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed fixes the draws


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"this is not an image", {"Content-Type": "image/png"}, 400, "not a readable image"),
        (b"", {"Content-Type": "image/png"}, 400, "empty body"),
        (multipart({"note": "x"}, {})[0], multipart({}, {})[1], 400, "no image in the form"),
        (multipart({}, {"image": ("x.txt", b"plain text")})[0], multipart({}, {})[1], 400, "not a readable image"),
        (b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "is not an image"),
        (multipart({}, {"image": ("a.png", b"x"), "other": ("b.png", b"y")})[0], multipart({}, {})[1], 400, "Too many files"),
        (multipart({"image": "text"}, {})[0], multipart({}, {})[1], 400, "the field `image` is text"),
        (multipart({"note": "x" * 5000}, {"image": ("a.png", b"x")})[0], multipart({}, {})[1], 400, "Part exceeded maximum size"),
    ],
    ids=["not-an-image", "empty", "form-without-image", "text-file-in-form", "urlencoded", "two-files", "image-as-text", "long-field"],
)
def test_bad_uploads_get_400_with_a_json_error_and_the_server_goes_on(server: VlmServer, images: list[Path], body: bytes, headers: dict, status: int, message: str) -> None:
    got, response_headers, data = request(server, "POST", "/caption", body, headers)
    assert got == status and response_headers["content-type"] == "application/json"
    error = json.loads(data)
    assert message in error["error"] and error.get("fix")
    assert post_caption(server, images[0].read_bytes())[0] == 200


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"variant": "int8"}, "variant 'int8' is not in this bundle"),
        ({"num_beams": "many"}, "num_beams must be an integer from 1 to 4 (got 'many')"),
        ({"num_beams": "0"}, "num_beams must be from 1 to 4 (got 0)"),
        ({"num_beams": "10000"}, "num_beams must be from 1 to 4 (got 10000)"),
        ({"max_new_tokens": "100000"}, "max_new_tokens must be from 1 to 8 (got 100000)"),  # the tiny model's max_length
        ({"num_beams": "4", "max_new_tokens": "1_000"}, "max_new_tokens must be an integer"),
        ({"num_beams": "--2"}, "num_beams must be an integer"),
        ({"top_p": "1.5", "do_sample": "1"}, "top_p must be a finite number in (0, 1] (got '1.5')"),
        ({"seed": "-1", "do_sample": "true"}, "seed must be from 0 to 4294967295 (got -1)"),
        ({"temperature": "inf", "do_sample": "true"}, "temperature must be a finite number in (0, 100] (got 'inf')"),
        ({"temperature": "nan", "do_sample": "true"}, "temperature must be a finite number"),
        ({"do_sample": "maybe"}, "do_sample must be true or false (got 'maybe')"),
        ({"temperature": "0.7"}, "temperature applies only to sampling"),
        ({"length_penalty": "2"}, "length_penalty applies only to beam search"),
        ({"early_stopping": "soon", "num_beams": "2"}, "early_stopping must be true, false or never (got 'soon')"),
        ({"beams": "2"}, "unknown field(s) 'beams'"),
    ],
)
def test_bad_options_get_400_naming_the_problem_and_the_field(server: VlmServer, images: list[Path], fields: dict[str, str], message: str) -> None:
    status, body = post_caption(server, images[0].read_bytes(), **fields)
    assert status == 400 and message in body["error"], body
    assert body.get("field") in fields or fields == {"variant": "int8"}


def test_uploads_over_the_limit_get_413_without_being_read(server: VlmServer, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.service, "settings", replace(server.service.settings, max_upload_bytes=100))
    status, headers, data = request(server, "POST", "/caption", images[0].read_bytes(), {"Content-Type": "image/png"})
    assert status == 413 and "over the 0.0001 MB limit" in json.loads(data)["error"]
    assert headers.get("connection") == "close"  # the unread body must not be parsed as a request
    monkeypatch.undo()
    assert post_caption(server, images[0].read_bytes())[0] == 200


def test_post_without_length_gets_411_other_paths_404_and_other_methods_405(server: VlmServer) -> None:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.putrequest("POST", "/caption")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    connection.send(b"0\r\n\r\n")
    response = connection.getresponse()
    assert response.status == 411 and "chunked" in json.loads(response.read())["error"]
    connection.close()
    status, _, data = request(server, "POST", "/upload", b"x", {"Content-Type": "image/png"})
    assert status == 404 and "POST images to /caption" in json.loads(data)["fix"]
    status, headers, data = request(server, "GET", "/caption")
    assert status == 405 and headers["allow"] == "POST" and "POST an image" in json.loads(data)["fix"]
    status, headers, _ = request(server, "DELETE", "/health")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, _ = request(server, "OPTIONS", "/caption")  # no route takes OPTIONS: Starlette's own 405
    assert status == 405 and headers["allow"] == "POST"


def test_a_failure_inside_the_runtime_is_a_500_and_the_server_goes_on(server: VlmServer, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(server.service, "caption", broken)
    status, body = post_caption(server, images[0].read_bytes())
    assert status == 500 and body["error"] == "internal error (RuntimeError)"
    monkeypatch.undo()
    assert post_caption(server, images[0].read_bytes())[0] == 200


def test_concurrent_requests_all_get_their_own_caption(server: VlmServer, bundle: Path, images: list[Path]) -> None:
    expected = caption_images(bundle, images, batch_size=1)
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = post_caption(server, images[i % len(images)].read_bytes())[1]["caption"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [results[i] for i in range(6)] == [expected[i % len(images)] for i in range(6)]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/web/prefix_vlm.js", "text/javascript; charset=utf-8"),
        ("/web/decoding.js", "text/javascript; charset=utf-8"),
        ("/bundle/vlmexport.json", "application/json"),
        ("/bundle/tokenizer.json", "application/json"),
        ("/bundle/language_model/model.onnx", "application/octet-stream"),
    ],
)
def test_page_script_and_bundle_files_are_served_with_their_mime_type_and_isolation_headers(server: VlmServer, bundle: Path, path: str, content_type: str) -> None:
    status, headers, data = request(server, "GET", path)
    assert status == 200 and headers["content-type"] == content_type
    assert headers["cross-origin-opener-policy"] == "same-origin" and headers["cross-origin-embedder-policy"] == "require-corp"
    if path.startswith("/bundle/"):
        assert data == (bundle / path.removeprefix("/bundle/")).read_bytes()


def test_onnxruntime_web_and_the_tokenizer_come_from_node_modules_not_a_cdn(server: VlmServer) -> None:
    require(all(root.is_dir() for root in VENDOR.values()), "web/node_modules (npm ci in web/)")
    status, headers, data = request(server, "GET", "/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm")
    assert status == 200 and headers["content-type"] == "application/wasm" and data[:4] == b"\0asm"
    for path in ("/vendor/onnxruntime-web/ort.wasm.bundle.min.mjs", "/vendor/tokenizers/tokenizers.min.mjs"):
        status, headers, _ = request(server, "GET", path)
        assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
    _, _, page = request(server, "GET", "/")
    assert b"https://" not in page and b"http://" not in page  # every import is local


@pytest.mark.parametrize(
    "path",
    [
        "/bundle/notes.txt",  # in the folder, not in the manifest
        "/bundle/../pyproject.toml",
        "/bundle/%2e%2e/%2e%2e/pyproject.toml",
        "/web/../pyproject.toml",
        "/web/test/browser.mjs",
        "/web/install-deps.sh",
        "/web/package.json",
        "/vendor/onnxruntime-web/../package.json",
        "/vendor/tokenizers/",
        "/etc/passwd",
    ],
)
def test_nothing_outside_the_page_its_packages_and_the_manifest_is_served(server: VlmServer, path: str) -> None:
    status, _, _ = request(server, "GET", path)
    assert status == 404


def test_make_server_refuses_a_folder_without_a_bundle_and_a_busy_port(server: VlmServer, tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(BundleError, match="vlmexport.json is missing"):
        make_server(tmp_path, "127.0.0.1", 0)
    with pytest.raises(UsageError, match="cannot listen on 127.0.0.1"):
        make_server(bundle, "127.0.0.1", server.server_address[1])


def test_make_server_refuses_a_file_that_differs_from_its_manifest(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    graph = next(iter(sorted(copy.glob("*.onnx"))))
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{graph.name} does not match its manifest sha256"):
        make_server(copy, "127.0.0.1", 0)


def test_serve_command_with_no_bundle_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--onnx-dir", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and len(err.splitlines()) == 1


def test_a_bundle_changed_while_serving_serves_its_new_manifest(server: VlmServer, bundle: Path) -> None:
    # The manifest is read per request: a file a later quantize adds is served without a restart.
    manifest = read_manifest(bundle)
    extra = bundle / "extra.json"
    try:
        extra.write_text("{}")
        assert request(server, "GET", "/bundle/extra.json")[0] == 404
        manifest.describe_file(bundle, "extra.json")
        manifest.write(bundle)
        assert request(server, "GET", "/bundle/extra.json")[0] == 200
    finally:
        manifest.files.pop("extra.json", None)
        manifest.write(bundle)
        extra.unlink()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "attacker.example"}, 403),  # DNS rebinding: the page's name, our address
        ({"Host": "attacker.example:8000"}, 403),
        ({"Host": "localhost:1:2"}, 403),
        ({"Origin": "http://attacker.example"}, 403),  # a cross-origin POST from a page
        ({"Origin": "null"}, 403),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Host": "localhost"}, 200),
        ({"Host": "app.localhost"}, 200),
    ],
)
def test_host_header_and_cross_origin_posts_are_checked(server: VlmServer, images: list[Path], headers: dict[str, str], status: int) -> None:
    body, form = multipart({}, {"image": ("photo.png", images[0].read_bytes())})
    got, response_headers, data = request(server, "POST", "/caption", body, {**form, **headers})
    assert got == status, data
    assert response_headers["cross-origin-embedder-policy"] == "require-corp"  # on refusals too
    if status == 403:
        assert "Host" in json.loads(data)["error"] or "cross-origin" in json.loads(data)["error"]
    assert request(server, "GET", "/health", headers={"Host": "attacker.example"})[0] == 403


def test_same_origin_post_from_the_served_page_is_accepted(server: VlmServer, images: list[Path]) -> None:
    host = f"127.0.0.1:{server.server_address[1]}"
    body, form = multipart({}, {"image": ("photo.png", images[0].read_bytes())})
    assert request(server, "POST", "/caption", body, {**form, "Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"})[0] == 200


def test_host_policy_widens_only_as_asked() -> None:
    local = host_policy("127.0.0.1")
    assert local.allows("localhost:8000") and local.allows("[::1]:8000") and not local.allows("192.168.1.5")
    anywhere = host_policy("0.0.0.0")
    assert anywhere.allows("192.168.1.5:8000") and anywhere.allows("[fe80::1]") and not anywhere.allows("attacker.example")
    assert host_policy("127.0.0.1", ["captions.lan"]).allows("captions.lan:80") and host_policy("127.0.0.1", ["*"]).allows("anything.example")


def test_health_openapi_and_docs_describe_the_server_and_its_limits(server: VlmServer) -> None:
    status, _, data = request(server, "GET", "/health")
    health = json.loads(data)
    assert status == 200 and health["status"] == "ok" and health["variants"] == ["fp32"] and health["workers"] >= 1
    assert health["max_new_tokens"] == 8 and health["max_beams"] == 4  # the tiny model's max_length; the default beam cap
    schema = json.loads(request(server, "GET", "/openapi.json")[2])
    post = schema["paths"]["/caption"]["post"]
    fields = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"image", "num_beams", "max_new_tokens", "do_sample", "seed", "temperature"} <= set(fields)
    assert fields["num_beams"]["maximum"] == 4 and fields["max_new_tokens"]["maximum"] == 8
    assert {"400", "403", "413", "503"} <= set(post["responses"])
    status, headers, page = request(server, "GET", "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"POST /caption" in page and b"https://" not in page


def test_bundle_files_have_etags_and_ranges(server: VlmServer, bundle: Path) -> None:
    status, headers, data = request(server, "GET", "/bundle/vlmexport.json")
    assert status == 200 and headers["etag"] and headers["accept-ranges"] == "bytes"
    assert request(server, "GET", "/bundle/vlmexport.json", headers={"If-None-Match": headers["etag"]})[0] == 304
    assert request(server, "GET", "/bundle/vlmexport.json", headers={"If-None-Match": '"other"'})[0] == 200
    status, ranged, part = request(server, "GET", "/bundle/projection.onnx", headers={"Range": "bytes=10-29"})
    assert status == 206 and part == (bundle / "projection.onnx").read_bytes()[10:30]
    assert ranged["content-range"].startswith("bytes 10-29/")
    status, headers, _ = request(server, "HEAD", "/bundle/projection.onnx")
    assert status == 200 and int(headers["content-length"]) == (bundle / "projection.onnx").stat().st_size


def test_a_16_bit_png_is_captioned_like_its_8_bit_copy(server: VlmServer, images: list[Path]) -> None:
    eight = np.asarray(Image.open(images[1]).convert("L"))
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)  # 255 → 65535, exactly
    assert sixteen.mode == "I;16"
    buffers = {}
    for name, image in (("8", Image.fromarray(eight)), ("16", sixteen)):
        buffers[name] = io.BytesIO()
        image.save(buffers[name], "PNG")
    captions = {name: post_caption(server, buffer.getvalue())[1]["caption"] for name, buffer in buffers.items()}
    white = io.BytesIO()
    Image.fromarray(np.full_like(eight, 255)).save(white, "PNG")
    assert captions["16"] == captions["8"] != post_caption(server, white.getvalue())[1]["caption"]  # not read as all white


def test_the_access_log_escapes_control_characters(bundle: Path) -> None:
    lines: list[str] = []
    with running_server(bundle, log=lines.append) as server:
        request(server, "GET", "/bundle/x%0d%0aFAKE%201.2.3.4%20%22GET%20/%22%20200%1b[31m")
        request(server, "GET", "/health")
    assert len(lines) == 2 and all("\r" not in line and "\n" not in line and "\x1b" not in line for line in lines)
    assert "\\r\\nFAKE" in lines[0] and "\\x1b[31m" in lines[0] and lines[0].endswith(tuple(f"{n} ms" for n in range(100000)))


def test_the_captioner_api_captions_paths_arrays_bytes_and_batches(bundle: Path, images: list[Path]) -> None:
    expected = caption_images(bundle, images, batch_size=1)
    captioner = Captioner(bundle, threads=1)
    assert captioner.caption(images) == expected
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    assert captioner.caption([arrays[0], images[1].read_bytes(), str(images[2])]) == expected
    batch = captioner({"path": np.asarray([str(p) for p in images]), "image": np.asarray(arrays)})
    assert list(batch["caption"]) == expected and list(batch["path"]) == [str(p) for p in images]
    with pytest.raises(ImageError, match="no `image` or `bytes` column"):
        captioner({"text": np.asarray(["x"])})


def test_beyond_the_pool_and_its_queue_requests_get_503_with_retry_after_at_once(bundle: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with running_server(bundle, settings=Settings(workers=1, queue=1)) as server:
        release, entered = threading.Event(), threading.Semaphore(0)
        real = server.service.caption

        def held(*args, **kwargs):
            entered.release()
            release.wait(30)
            return real(*args, **kwargs)

        monkeypatch.setattr(server.service, "caption", held)
        answers: list[int] = []
        clients = [threading.Thread(target=lambda: answers.append(post_caption(server, images[0].read_bytes())[0])) for _ in range(2)]
        for client in clients:
            client.start()
        assert entered.acquire(timeout=30)  # one running, and one more admitted to the queue:
        deadline = time.monotonic() + 30
        while server.service.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        body, form = multipart({}, {"image": ("photo.png", images[0].read_bytes())})
        status, headers, data = request(server, "POST", "/caption", body, form)  # the third is refused, not queued
        assert status == 503 and int(headers["retry-after"]) >= 1 and "busy" in json.loads(data)["error"]
        release.set()
        for client in clients:
            client.join(60)
        assert answers == [200, 200]
        assert json.loads(request(server, "GET", "/health")[2])["pending"] == 0


def test_parsing_a_form_has_a_time_budget_that_network_waits_do_not_use() -> None:
    async def chunks(pause: float):
        for _ in range(3):
            await asyncio.sleep(pause)  # the network: not counted
            yield b"x" * 10

    async def consume(pause_network: float, work: float) -> int:
        count = 0
        async for _ in _parse_budget(chunks(pause_network), 0.05):
            time.sleep(work)  # the parser: counted
            count += 1
        return count

    assert asyncio.run(consume(0.05, 0.0)) == 3
    with pytest.raises(RequestError, match="the form took over 0.05 s to parse"):
        asyncio.run(consume(0.0, 0.03))

"""The browser side: web/prefix_vlm.js under Node (onnxruntime-web, WebAssembly) gives the Python
runtime's tokens, and the demo page in headless Chromium gives the Python runtime's caption.

The shapes example is exported in both layouts, each with an int8 variant. Python computes the
references (pixel values, greedy and beam-search tokens, captions, PIL resizes) into a JSON file
that web/test/prefix_vlm.test.mjs checks; the browser test drives web/demo.html from a real
`vlmexport serve` through web/test/browser.mjs. Node, Chromium and the npm packages come from
web/install-deps.sh: missing, these tests skip on a developer's machine and fail under CI=true.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from serving import require, running_server

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.manifest import read_manifest
from vlmexport.bundle.preprocess import bundle_preprocessor, open_image
from vlmexport.bundle.tokenizer import decode, load_tokenizer
from vlmexport.cli import main as cli
from vlmexport.exporter.export import export_bundle
from vlmexport.quantize.quantize import quantize_bundle
from vlmexport.runtime.bundle import open_bundle
from vlmexport.runtime.caption import caption_images, caption_tokens
from vlmexport.samples import sample_images
from vlmexport.site.preview import static_server

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
SHAPES = REPO / "examples" / "shapes"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
VARIANTS = ("fp32", "int8")
# (width, height, out width, out height): down, up, mixed, and both of Pillow 13's pass orders.
RESIZES = [(64, 64, 32, 32), (50, 37, 224, 224), (300, 200, 224, 224), (17, 90, 33, 45), (100, 80, 100, 30), (9, 120, 40, 20)]


@pytest.fixture(scope="module")
def node() -> None:
    """Node and the pinned npm packages (checked before any bundle is built)."""
    require(shutil.which("node") is not None, "node")
    packages = ("onnxruntime-web", "@huggingface/tokenizers", "playwright-core")
    require(all((WEB / "node_modules" / p / "package.json").is_file() for p in packages), "web/node_modules (npm ci in web/)")


@pytest.fixture(scope="module")
def chromium(node: None) -> None:
    require(CHROMIUM.is_file(), f"Chromium ({CHROMIUM})")


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


@pytest.fixture(scope="module")
def shapes(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """(checkpoint, four images): the trained shapes example and its held-out images; the tiny
    test checkpoint and drawn shapes when the example has not been built in this tree."""
    model, held_out = SHAPES / "model", sorted((SHAPES / "images").glob("*.png"))[:4]
    if (model / "config.json").is_file() and len(held_out) == 4:
        return model, held_out
    folder = tmp_path_factory.mktemp("shapes-images")
    images = []
    for i, image in enumerate(sample_images(4, 64, seed=3)):
        images.append(folder / f"{i:03d}.png")
        image.save(images[-1])
    return make_checkpoint("web"), images


@pytest.fixture(scope="module")
def bundles(shapes: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Layout → bundle folder with fp32 and int8 variants."""
    checkpoint, _ = shapes
    root = tmp_path_factory.mktemp("web-bundles")
    made = {}
    for layout in ("distilvit", "compact"):
        export_bundle(checkpoint, root / layout, layout=layout, verify=False)
        quantize_bundle(root / layout, "int8", verify=False)
        made[layout] = root / layout
    return made


@pytest.fixture(scope="module")
def families(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """fp32 distilvit bundles of the decoder families with absolute positions (GPT-2, OPT): their
    graphs differ from Llama's around the attention (no rotary embedding, learned positions).
    fp32 only: their tiny random weights leave near ties that int8's float32 path in the browser
    may break differently from x86's integer kernels."""
    root = tmp_path_factory.mktemp("web-families")
    for text in ("gpt2", "opt"):
        export_bundle(make_checkpoint(f"web-{text}", text=text), root / text, layout="distilvit", verify=False)
    return [root / "gpt2", root / "opt"]


def python_reference(bundle_dir: Path, variant: str, images: list[Path]) -> dict:
    """What the Python runtime computes for these images: pixel values, tokens, captions.

    One image per pass, as prefix_vlm.js runs them. The int8 tokens must equal the browser's
    although the browser computes MatMulNBits in float32 where x86 quantizes activations per
    block: on the shapes model no greedy choice is close enough to flip (measured: 32/32 captions
    identical across every variant)."""
    bundle = open_bundle(bundle_dir, variant, threads=1)
    pixels = bundle_preprocessor(bundle_dir)([open_image(p) for p in images])
    greedy = caption_tokens(bundle, pixels, DecodeOptions(), batch_size=1)
    return {
        "name": f"{bundle_dir.name}-{variant}",
        "dir": f"{bundle_dir}/",
        "variant": variant,
        "pixels": b64(pixels.astype(np.float32)),
        "dims": list(pixels.shape),
        "greedy": greedy,
        "beam3": caption_tokens(bundle, pixels, DecodeOptions(num_beams=3), batch_size=1),
        "captions": decode(load_tokenizer(bundle_dir), greedy),
    }


def resize_references() -> list[dict]:
    """Random RGB images resized by PIL with every filter (what preprocess.js must reproduce)."""
    rng = np.random.default_rng(0)
    cases = []
    for width, height, out_w, out_h in RESIZES:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for resample in range(6):
            out = np.asarray(Image.fromarray(rgb).resize((out_w, out_h), resample=resample))
            cases.append({"width": width, "height": height, "outWidth": out_w, "outHeight": out_h, "resample": resample, "rgb": b64(rgb), "out": b64(out)})
    return cases


def preprocess_references(bundle_dir: Path, images: list[Path]) -> dict:
    """Decoded RGB of each image (and one with transparency) and the pixel values Python makes of it."""
    preprocessor = bundle_preprocessor(bundle_dir)
    rgba = np.asarray(Image.open(images[0]).convert("RGBA")).copy()
    rgba[..., 3] = np.arange(rgba.shape[1], dtype=np.uint8)[None, :] * 4  # a transparency ramp
    cases = []
    for raw in [np.asarray(open_image(p).convert("RGB")) for p in images] + [rgba]:
        pixels = preprocessor([Image.fromarray(raw)])[0]
        cases.append({"data": b64(raw), "width": raw.shape[1], "height": raw.shape[0], "channels": raw.shape[2], "pixels": b64(pixels)})
    return {"config": json.loads((bundle_dir / "preprocessor_config.json").read_text()), "cases": cases}


def run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done


@pytest.mark.parametrize("threads", [1, 2])
def test_prefix_vlm_in_node_gives_python_tokens_for_both_layouts_fp32_and_int8(node, bundles, families, shapes, tmp_path: Path, threads: int) -> None:
    _, images = shapes
    fixture = {
        "bundles": [python_reference(bundles[layout], variant, images) for layout in bundles for variant in VARIANTS]
        + [python_reference(bundle, "fp32", images) for bundle in families],
        "resize": resize_references(),
        "preprocess": preprocess_references(bundles["distilvit"], images),
    }
    # A bundle where one variant's token sequences vary across images proves the comparison can fail.
    assert any(len({tuple(t) for t in case["greedy"]}) > 1 for case in fixture["bundles"])
    path = tmp_path / "fixture.json"
    path.write_text(json.dumps(fixture))
    env = {**os.environ, "VLM_WEB_FIXTURE": str(path), "VLM_WEB_THREADS": str(threads)}
    done = run(["node", "--test", "--test-reporter=tap", "test/prefix_vlm.test.mjs"], 240, cwd=WEB, env=env)
    counts = {key: int(value) for key, value in re.findall(r"^# (pass|fail|skipped) (\d+)$", done.stdout, re.M)}
    assert counts.get("fail") == 0 and counts.get("skipped") == 0 and counts.get("pass", 0) >= 4 + len(fixture["bundles"]), done.stdout[-3000:]


def test_demo_page_in_chromium_captions_like_python_fp32_and_int8_on_1_and_2_threads(chromium, bundles, shapes) -> None:
    _, images = shapes
    bundle = bundles["distilvit"]
    with running_server(bundle) as server:
        for variant, threads in zip(VARIANTS, ("1", "2")):
            command = ["node", "test/browser.mjs", "--url", f"{server.url}/", "--variant", variant, "--threads", threads, "--image", str(images[0]), "--compare"]
            page = json.loads(run(command, 180, cwd=WEB).stdout)
            assert page["threads"] == int(threads) and f"threads: {threads}" in page["shown"]["threads"]
            expected = caption_images(bundle, [images[0]], variant)[0]
            (result,) = page["results"]
            assert result["caption"] == expected, (variant, result, expected)
            assert result["shown"] == expected  # what the page displays, not only what it computed
            assert result["python"]["caption"] == expected  # the page's own POST /caption round trip
            assert result["tokens"] == result["python"]["tokens"]
            assert page["crossOriginIsolated"] is True  # COOP/COEP served: threads would be possible
            assert set(result["timings"]) >= {"preprocess", "vision", "projection", "firstPass", "steps", "tokenizer", "total"}
            assert not [m for m in page["messages"] if m.startswith(("error", "pageerror"))], page["messages"]


def bundle_requests(log: Path, since: int) -> tuple[set[str], int]:
    """The bundle files the browser asked the static server for (200 or 304) after log line `since`,
    and the new line count."""
    lines = log.read_text(errors="replace").splitlines()
    sent = {m.group(1) for line in lines[since:] if (m := re.search(r'"GET /bundle/(\S+) HTTP/1\.[01]" (200|304)', line))}
    return sent, len(lines)


def test_static_site_runs_threads_caches_by_sha256_and_survives_bad_input(chromium, bundles, shapes, tmp_path: Path) -> None:
    """`vlmexport site` served by a plain static server: cross-origin isolated by the service worker,
    2+ threads, Python's caption; a second visit fetches only the manifest, a changed file alone;
    a non-image and a file that does not match its hash each give one message and the page goes on."""
    _, images = shapes
    bundle = tmp_path / "onnx"
    shutil.copytree(bundles["distilvit"], bundle)
    site = tmp_path / "site"
    assert cli(["site", "--onnx-dir", str(bundle), "--output-dir", str(site), "--no-webgpu"]) == 0
    assert "Cross-Origin-Embedder-Policy: require-corp" in (site / "_headers").read_text()
    expected = caption_images(bundle, [images[0]], "int8")[0]
    profile, log = tmp_path / "profile", tmp_path / "http.log"
    browse = ["node", "test/browser.mjs", "--profile", str(profile), "--variant", "int8"]
    with static_server(site, log) as url:
        first = json.loads(run([*browse, "--url", url, "--image", str(images[0])], 180, cwd=WEB).stdout)
        assert first["crossOriginIsolated"] is True, first["messages"]
        assert first["threads"] == min(4, first["hardwareConcurrency"]) and first["threads"] >= min(2, first["hardwareConcurrency"])
        assert first["results"][0]["caption"] == expected
        sent, seen = bundle_requests(log, 0)
        assert "vlmexport.json" in sent and len(sent) == len(first["loadStats"]["downloaded"]) + 1

        second = json.loads(run([*browse, "--url", url, "--image", str(images[0])], 180, cwd=WEB).stdout)
        sent, seen = bundle_requests(log, seen)
        assert sent == {"vlmexport.json"}, sent  # everything else from Cache Storage
        assert second["loadStats"]["downloadedBytes"] == 0 and second["results"][0]["caption"] == expected

        # Re-export one graph (same model, new bytes): only that file travels again.
        projection = site / "bundle" / "projection_int8.onnx"
        graph = onnx.load(projection)
        graph.doc_string = "re-exported"
        onnx.save(graph, projection)
        manifest = read_manifest(site / "bundle")
        manifest.describe_file(site / "bundle", "projection_int8.onnx", **{k: v for k, v in manifest.files["projection_int8.onnx"].items() if k not in ("size", "sha256")})
        manifest.write(site / "bundle")
        third = json.loads(run([*browse, "--url", url, "--image", str(images[0]), "--clear-cache"], 180, cwd=WEB).stdout)
        sent, seen = bundle_requests(log, seen)
        assert sent == {"vlmexport.json", "projection_int8.onnx"}, sent
        assert third["results"][0]["caption"] == expected and third["cacheEntries"] == 0  # the button emptied it

        # Bad input: a non-image, then a real image on the same page; a file changed behind the manifest's back.
        junk = tmp_path / "junk.png"
        junk.write_bytes(b"not an image at all")
        bad = json.loads(run([*browse, "--url", url, "--image", str(junk), "--image", str(images[0]), "--keep-going", "--clear-cache"], 180, cwd=WEB).stdout)
        assert "not a readable image" in bad["results"][0]["error"] and bad["results"][0]["shownError"] == bad["results"][0]["error"]
        assert bad["results"][1]["caption"] == expected
        tampered = bytearray(projection.read_bytes())
        tampered[-1] ^= 1
        projection.write_bytes(bytes(tampered))
        done = subprocess.run([*browse, "--url", url, "--image", str(images[0]), "--clear-cache"], capture_output=True, text=True, timeout=180, cwd=WEB)
        assert done.returncode == 1 and "projection_int8.onnx does not match its manifest sha256" in done.stderr, done.stderr[-2000:]
        assert "pageerror" not in done.stderr


def test_webgpu_placement_names_the_ops_without_a_kernel_in_the_pinned_runtime(chromium, tmp_path: Path) -> None:
    """onnxruntime-web's own WebGPU registry, asked through headless Chromium's software adapter:
    a dynamic-int8 MatMul has no kernel, a float MatMul and Relu have one (opset 18)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "scale", "zero"], name="quantize"),
        helper.make_node("MatMulInteger", ["xq", "w", "zero", "wzero"], ["acc"], name="matmul_int8"),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("MatMul", ["accf", "v"], ["y0"], name="matmul_fp32"),
        helper.make_node("Relu", ["y0"], ["y"], name="relu"),
    ]
    inits = [
        helper.make_tensor("w", TensorProto.UINT8, [4, 4], list(range(16))),
        helper.make_tensor("wzero", TensorProto.UINT8, [], [3]),
        helper.make_tensor("v", TensorProto.FLOAT, [4, 2], [0.5] * 8),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), tmp_path / "g.onnx")
    # An 8-bit MatMulNBits (the int8 recipe): claimed by the WebGPU kernel, which then refuses 8 bits.
    nbits = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=16, N=2, bits=8, block_size=16, name="nbits")
    blocks = [helper.make_tensor("b", TensorProto.UINT8, [2, 1, 16], [128] * 32), helper.make_tensor("s", TensorProto.FLOAT, [2], [0.1, 0.2])]
    graph = helper.make_graph([nbits], "n", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], blocks)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), tmp_path / "n.onnx")
    placed = json.loads(run(["node", "tools/webgpu_placement.mjs", str(tmp_path), "g.onnx", "n.onnx"], 180, cwd=WEB).stdout)
    assert placed["g.onnx"]["fallbacks"] == {"DynamicQuantizeLinear": 1, "MatMulInteger": 1} and placed["g.onnx"]["error"] is None, placed
    assert "MatMulNBits" in placed["n.onnx"]["error"], placed
    assert cli(["inspect", str(tmp_path), "--target", "gpu"]) == 2


def test_demo_on_webgpu_software_adapter_captions_like_python(chromium, bundles, shapes, tmp_path: Path) -> None:
    """device=webgpu on SwiftShader: WebGPU kernels where the runtime has them, the CPU for the rest,
    and the same caption as the Python runtime."""
    _, images = shapes
    bundle = bundles["distilvit"]
    site = tmp_path / "site"
    assert cli(["site", "--onnx-dir", str(bundle), "--output-dir", str(site)]) == 0
    with static_server(site, tmp_path / "http.log") as url:
        command = ["node", "test/browser.mjs", "--url", url, "--variant", "fp32", "--device", "webgpu", "--webgpu", "--image", str(images[0])]
        page = json.loads(run(command, 240, cwd=WEB).stdout)
    assert page["device"] == "webgpu", page["notes"]
    assert page["results"][0]["caption"] == caption_images(bundle, [images[0]], "fp32")[0]

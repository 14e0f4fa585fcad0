"""Real inputs for every graph of a bundle: what captioning the bundled sample images feeds each one.

Measuring activation ranges (fp16) needs each graph's inputs as the decoding loop produces
them — the prefix pass, then cached steps — so the fp32 bundle captions sample images while
its sessions record what they are fed. GPTQ's calibration (`calibrate`) runs the fp32 bundle
with Probes in place of some sessions: graphs that also output the tensors being measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from vlmexport.bundle.manifest import decoder_graphs, read_manifest
from vlmexport.bundle.preprocess import IMAGE_SUFFIXES, bundle_preprocessor, image_names, open_image
from vlmexport.bundle.tokenizer import load_tokenizer
from vlmexport.errors import UsageError
from vlmexport.resources import configs_dir
from vlmexport.runtime.bundle import open_bundle, session
from vlmexport.runtime.generate import greedy
from vlmexport.samples import sample_images

IMAGES = 4
STEPS = 6
# GPTQ's calibration (calibrate): images other than the ones `check` and the fidelity bench
# judge (sample_images' seed 0), each captioned by fp32 for this many tokens, and English prose
# other than the fidelity text (configs/calibration/text.txt, written for this) in rows of
# CALIBRATION_ROW tokens. Without the prose, q4's decoder rounded against image prefixes alone
# doubled its KL on text (real-weights model, 96 images + text: 0.115 → 0.21).
# 128 images, not 32: Hessians over 25,088 prefix rows instead of 6,272 (the vision encoder's fc2
# reads 3,072 channels). Real-weights model, 96 other images + text, one-ulp draws 0-2, AMD EPYC
# AVX512-VNNI, mean KL (positions over 1 nat): q4 0.101 · 0.102 · 0.101 → 0.0983 · 0.0949 · 0.1005
# (30-35; median position 0.024 → 0.018, the one gain of the typical position; its text 0.038 →
# 0.050, the prose now a smaller share of the sums). int8's median position stays 0.0017 and its
# knife edges re-draw: 0.0107 · 0.0125 · 0.0130 (5-8) → 0.0092 · 0.0079 · 0.0084 (2-3); on the
# captioner preset 0.0050 · 0.0051 · 0.0047 (0) → 0.0069 · 0.0088 · 0.0083 (3-4) — every draw of
# both presets under int8's goal, where 32 left each of the first's over it. uint8 the same within
# its draws (0.0139-0.0180 → 0.0159-0.0189). The cost: quantize takes 2.7× as long (two runs
# sharing the 2 cores: 290 → 794 s). q4 has since weighed its prefix rows a quarter (RECIPES["q4"]).
CALIBRATION_IMAGES = 128
CALIBRATION_TOKENS = 20
CALIBRATION_SEED = 1
CALIBRATION_TEXT = configs_dir() / "calibration" / "text.txt"
CALIBRATION_ROW = 128
# `quantize --calibration-images DIR`: at most this many of the folder's images, evenly spaced in
# its sorted list (each costs an encoder pass, a greedy caption and a decoder pass).
CALIBRATION_MAX_IMAGES = 128
CALIBRATION_BATCH = 4


class _Recording:
    """An onnxruntime session that keeps a copy of every feed it is given."""

    def __init__(self, session: Any, sink: list[dict[str, np.ndarray]]) -> None:
        self.session, self.sink = session, sink

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.sink.append({name: np.array(value) for name, value in feeds.items()})
        return self.session.run(outputs, feeds)


def recorded_feeds(onnx_dir: Path, images: int = IMAGES, steps: int = STEPS) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per fp32 component, the feeds of one batch of sample images captioned for `steps` tokens.

    Raises:
        BundleError: the fp32 bundle cannot be opened.
    """
    bundle = open_bundle(onnx_dir, "fp32")
    feeds: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in bundle.sessions}
    bundle.sessions = {name: _Recording(s, feeds[name]) for name, s in bundle.sessions.items()}
    preprocessor = bundle_preprocessor(onnx_dir)
    pixels = preprocessor(sample_images(images, preprocessor.height))
    # eos=None: decode every step, so the cached-step graph is measured as often as asked.
    greedy(bundle, bundle.prefix(pixels), steps, None, bundle.manifest.model["pad_token_id"])
    return feeds


@dataclass(frozen=True)
class CalibrationImages:
    """GPTQ's calibration images as the bundle's pixel values, and what they are (for the manifest)."""

    pixels: np.ndarray
    source: str


def calibration_images(onnx_dir: Path, folder: Path | None = None) -> CalibrationImages:
    """The bundled sample images (CALIBRATION_IMAGES of seed CALIBRATION_SEED), or up to
    CALIBRATION_MAX_IMAGES image files of `folder` (recursive, evenly spaced in sorted order).

    Raises:
        UsageError: `folder` is not a folder or holds no image files.
        ImageError: one of the chosen files is not a readable image.
        BundleError: the bundle's preprocessor config cannot be read.
    """
    preprocessor = bundle_preprocessor(onnx_dir)
    if folder is None:
        # fixed=False: no gradient or stripes, which every seed shares with the images check judges.
        pictures = sample_images(CALIBRATION_IMAGES, preprocessor.height, seed=CALIBRATION_SEED, fixed=False)
        return CalibrationImages(preprocessor(pictures), f"{CALIBRATION_IMAGES} sample images (seed {CALIBRATION_SEED}, none of the ones check judges)")
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--calibration-images {folder} is not a folder", "pass a folder of images like the ones the model will caption")
    names = image_names(folder)
    if not names:
        raise UsageError(f"--calibration-images {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})", "pass a folder with images in it")
    picks = np.linspace(0, len(names) - 1, min(len(names), CALIBRATION_MAX_IMAGES)).round().astype(int)
    pixels = preprocessor([open_image(folder / names[i]) for i in picks])
    chosen = f"{len(picks)} of the {len(names)}" if len(picks) < len(names) else f"the {len(names)}"
    return CalibrationImages(pixels, f"{chosen} images in {folder.name or folder}/ (--calibration-images)")


def calibrate(onnx_dir: Path, pixels: np.ndarray, probes: Mapping[str, Probe], tokens: int = CALIBRATION_TOKENS, prefix_weight: float = 1.0) -> None:
    """GPTQ's calibration, run on the fp32 bundle with `probes` (component → Probe of its fp32
    graph) in place of those components' sessions: each image of `pixels` (calibration_images)
    is encoded, then teacher-forced in one first pass — its prefix, then fp32's greedy caption of
    it; then the calibration text, a first pass per row with no prefix. The probes record those
    passes, not the caption's own greedy steps. In the teacher-forced passes, each position of
    the image prefix weighs `prefix_weight` in the first-pass graph's Hessians, each caption
    token and row of prose 1 (HessianSums).

    One pass per image holds every position's activations without a growing cache of past keys
    and values. Where the cached steps have a graph of their own (distilvit's language_model),
    it is rounded against these first passes: the same weights and tensor names
    (decoder_graphs). Each probed graph runs once per pass: the values it records are those of
    the run the calibration needs anyway.

    Raises:
        BundleError: the fp32 bundle cannot be opened.
    """
    manifest = read_manifest(onnx_dir)
    bundle = open_bundle(onnx_dir, "fp32", components=[name for name in manifest.variants["fp32"] if name not in probes])
    bundle.sessions.update(probes)
    pad = bundle.manifest.model["pad_token_id"]
    with _recording(probes):
        prefixes = [bundle.prefix(pixels[i : i + 1]) for i in range(len(pixels))]
    # The captions a batch at a time (speed only: a decode step costs about the same for 4 rows as
    # for one; not 16, whose first pass held 1.2 GB of logits in onnxruntime's arena on the
    # real-weights model, while the probes hold their sums); every row's prefix has the same length.
    captions = [
        row
        for start in range(0, len(prefixes), CALIBRATION_BATCH)
        for row in greedy(bundle, np.concatenate(prefixes[start : start + CALIBRATION_BATCH]), tokens, None, pad)
    ]
    tokens_of_text = load_tokenizer(onnx_dir).encode(CALIBRATION_TEXT.read_text().strip())
    no_prefix = np.zeros((1, 0, int(bundle.manifest.model["embed_dim"])), np.float32)
    first = decoder_graphs(manifest.layout)[0]
    weights = {first: np.array([prefix_weight] * prefixes[0].shape[1] + [1.0] * tokens)} if prefixes and prefix_weight != 1 else {}
    with _recording(probes, weights):
        for prefix, caption in zip(prefixes, captions, strict=True):
            bundle.first_pass(prefix, np.array([caption], np.int64))
    with _recording(probes):
        for start in range(0, len(tokens_of_text), CALIBRATION_ROW):
            bundle.first_pass(no_prefix, np.array([tokens_of_text[start : start + CALIBRATION_ROW]], np.int64))


@contextmanager
def _recording(probes: Mapping[str, Probe], weights: Mapping[str, np.ndarray] | None = None) -> Iterator[None]:
    """The probes record; `weights` (graph → one weight per position of each run) are handed to
    their sinks with the values."""
    for name, runner in probes.items():
        runner.recording, runner.weights = True, (weights or {}).get(name)
    try:
        yield
    finally:
        for runner in probes.values():
            runner.recording, runner.weights = False, None


class Probe:
    """An onnxruntime session of `model` that also computes the tensors `names` inside it. It
    runs as the plain session would (the same outputs); while `recording`, each run also hands
    the values of `names` to `sink`, in that order, with `weights` (None, or one weight per
    position of the run). One graph, one run: probing adds outputs, not passes."""

    def __init__(self, model: onnx.ModelProto, names: list[str], sink: Callable[[list[np.ndarray], np.ndarray | None], None], spin: bool = True) -> None:
        probed = onnx.ModelProto()
        probed.CopyFrom(model)
        self.outputs = [o.name for o in model.graph.output]
        probed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in self.outputs)
        self.session = session(probed.SerializeToString(), spin=spin)  # spin: as the plain session would (runtime.bundle.RUN_ONCE)
        del probed
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.names, self.sink, self.recording = list(names), sink, False
        self.weights: np.ndarray | None = None

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        wanted = self.outputs if outputs is None else list(outputs)
        extra = self.names if self.recording else []
        if not wanted and not extra:  # onnxruntime reads no output names as all of them
            if self.recording:
                self.sink([], self.weights)
            return []
        values = self.session.run(wanted + extra, {k: v for k, v in feeds.items() if k in self.inputs})
        if self.recording:
            self.sink(values[len(wanted) :], self.weights)
        return values[: len(wanted)]


def probe(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]], names: list[str]) -> Iterator[list[np.ndarray]]:
    """The values of the tensors `names` inside `model`, per feed: the graph run with them as
    extra outputs (one run per feed, no copy of the weights kept beyond the session's)."""
    got: list[list[np.ndarray]] = []
    runner = Probe(model, names, lambda values, _: got.append(values))
    runner.recording = True
    for feed in feeds:
        runner.run([], feed)
        yield got.pop()

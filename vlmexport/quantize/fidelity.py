"""How far a decoder variant's next-token distributions are from fp32's, teacher-forced.

The measure behind every recipe choice, `--keep-fp32 auto` and the README's fidelity table:
the fp32 bundle's own decoder is fed (a) image prefixes — the bundle's fp32 vision encoder and
projection on sample images — followed by fp32's greedy tokens, and (b) real English text
(configs/fidelity/text.txt) with no prefix, and the variant's logits at every position are
compared with fp32's: mean KL(fp32 ‖ variant) and top-1 agreement where fp32's top-2 margin
is clear. Teacher forcing compares every position on the same inputs, so one early flip
neither hides nor exaggerates the rest. `sources` takes a variant apart: its decoder on fp32's
prefixes, fp32's decoder on its prefixes, and fp32's on its own prefixes plus random noise of the
variant's prefix error — what a random error that large costs fp32 itself (a yardstick, see `Sources`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmexport.bundle.decoding import strip_after_eos
from vlmexport.bundle.preprocess import bundle_preprocessor
from vlmexport.bundle.tokenizer import load_tokenizer
from vlmexport.resources import configs_dir
from vlmexport.runtime.bundle import Bundle, open_bundle
from vlmexport.runtime.generate import greedy
from vlmexport.samples import sample_images
from vlmexport.validate.metrics import clear_top1, kl_divergence, knife_edges, top2_margin

TEXT = configs_dir() / "fidelity" / "text.txt"


@dataclass(frozen=True)
class FidelitySet:
    """Teacher-forced sequences and fp32's logits along them (one sequence per row of the lists)."""

    prefixes: list[np.ndarray]  # [1, P, D]; P = 0 for text
    ids: list[np.ndarray]  # [1, T]
    reference: list[np.ndarray]  # fp32 logits [n, V]
    images: int  # how many of the sequences are image prefixes (the rest are text)
    pixels: np.ndarray  # [images, 3, H, W]: what a whole variant captions, end to end
    eos: int | None = None  # where a caption ends (the forced tokens run on past it)

    def caption_lengths(self) -> list[int]:
        """Per image, how many of fp32's forced tokens are its caption: up to and including the
        first EOS (a caption generated with EOS stops there), or all of them."""
        return [len(strip_after_eos(row[0].tolist(), self.eos, keep_eos=True)) for row in self.ids[: self.images]]


@dataclass(frozen=True)
class Fidelity:
    """A variant against fp32 on a FidelitySet."""

    kl: float  # mean KL(fp32 ‖ variant) per position, nats
    kl_images: float
    kl_text: float
    top1: float  # agreement where fp32's top-2 margin > margin
    clear_positions: int
    positions: int
    # Is the mean systematic or carried by a few positions? The median position's KL, and how
    # many positions exceed KNIFE_EDGE nats (on the real-weights model's random-vision prefixes a
    # handful of positions sit where any perturbation tips the decoder: 2-5 nats each).
    kl_median: float = 0.0
    knife_edges: int = 0
    kl_off_edges: float = 0.0  # the mean over the other positions: what the knife edges leave
    # The image positions that are the caption (fp32's tokens up to its EOS; `caption_lengths`):
    # positions after EOS are forced text no caption contains. With the trained projection most
    # shapes captions end after 8 tokens, while texture images (outside its training) ramble on.
    kl_captions: float = 0.0
    knife_edges_captions: int = 0
    captions_equal: float | None = None  # free-running greedy captions identical to fp32's (end to end only)
    captions_equal_clear: float | None = None  # ... identical up to fp32's first near-tie
    # Per image, in sample order, whether its caption is identical to fp32's: sample_images
    # alternates shapes (even) and textures (odd), and a captioning model is judged on the
    # images it was trained for (shapes) apart from the ones it rambles on.
    caption_matches: tuple[bool, ...] = ()

    def meets(self, max_kl: float, min_top1: float) -> bool:
        return self.kl <= max_kl and self.top1 >= min_top1


def text_ids(onnx_dir: Path, max_tokens: int = 128) -> np.ndarray:
    """The fidelity text in the bundle's own tokenizer, [1, T]."""
    ids = load_tokenizer(onnx_dir).encode(TEXT.read_text().strip())[:max_tokens]
    return np.array([ids], np.int64)


def fidelity_set(onnx_dir: Path, images: int = 16, tokens: int = 20, fp32: Bundle | None = None) -> FidelitySet:
    """`images` sample images captioned greedily by fp32 for `tokens` tokens, and the text.

    Raises:
        BundleError: the fp32 bundle cannot be opened.
    """
    onnx_dir = Path(onnx_dir)
    bundle = fp32 or open_bundle(onnx_dir, "fp32")
    preprocessor = bundle_preprocessor(onnx_dir)
    pad = bundle.manifest.model["pad_token_id"]
    pixels = preprocessor(sample_images(images, preprocessor.height))
    prefixes = [bundle.prefix(pixels[i : i + 1]) for i in range(images)]
    # eos=None: every sequence is `tokens` long, so every image weighs the same.
    ids = [np.array(greedy(bundle, prefix, tokens, None, pad), np.int64) for prefix in prefixes]
    width = int(bundle.manifest.model["embed_dim"])
    prefixes.append(np.zeros((1, 0, width), np.float32))
    ids.append(text_ids(onnx_dir))
    reference = decoder_logits(bundle, prefixes, ids)
    return FidelitySet(prefixes, ids, reference, images, pixels, bundle.manifest.model["eos_token_id"])


def decoder_logits(bundle: Bundle, prefixes: list[np.ndarray], ids: list[np.ndarray]) -> list[np.ndarray]:
    """The bundle's logits [n, V] along every sequence (prefix [1, P, D], ids [1, T]), one first
    pass each (batch 1: dynamic int8 scales stay per sequence)."""
    return [bundle.first_pass(prefix, row)[0][0] for prefix, row in zip(prefixes, ids, strict=True)]


def compare(fset: FidelitySet, logits: list[np.ndarray], margin: float) -> Fidelity:
    """The variant's `logits` (one array per sequence of `fset`) against fp32's; `margin` (nats,
    a profile's logits.top1_margin) is where fp32's top-2 stop being a near-tie."""
    per_sequence = [kl_divergence(ref, got) for ref, got in zip(fset.reference, logits, strict=True)]
    reference, got = np.concatenate(fset.reference), np.concatenate(logits)
    agreement = clear_top1(reference, got, margin)
    image_kl = np.concatenate(per_sequence[: fset.images]) if fset.images else np.zeros(0)
    text_kl = np.concatenate(per_sequence[fset.images :]) if len(per_sequence) > fset.images else np.zeros(0)
    every = np.concatenate(per_sequence)
    lengths = fset.caption_lengths()
    captions = np.concatenate([kl[:n] for kl, n in zip(per_sequence, lengths)]) if lengths else np.zeros(0)
    edges, off_edges = knife_edges(every)
    return Fidelity(
        kl=float(every.mean()),
        kl_images=float(image_kl.mean()) if image_kl.size else 0.0,
        kl_text=float(text_kl.mean()) if text_kl.size else 0.0,
        top1=agreement.rate,
        clear_positions=agreement.counted,
        positions=len(reference),
        kl_median=float(np.median(every)),
        knife_edges=edges,
        kl_off_edges=off_edges,
        kl_captions=float(captions.mean()) if captions.size else 0.0,
        knife_edges_captions=knife_edges(captions)[0],
    )


def end_to_end(fset: FidelitySet, variant: Bundle, margin: float) -> Fidelity:
    """A whole variant against fp32: its own vision encoder and projection make the image
    prefixes, its decoder is teacher-forced along fp32's tokens, and it captions freely.

    `captions_equal_clear` counts a caption as equal when it is identical to fp32's up to the
    first position where fp32's top-2 margin is ≤ `margin` (a near-tie, where either token is
    fp32's own choice by less than the variant's noise; what follows a different choice there
    is another caption, not an error) — and identical in full when fp32 has no near-tie.
    """
    return judge(fset, variant, variant_prefixes(fset, variant), margin)


def judge(fset: FidelitySet, runner: Bundle, prefixes: list[np.ndarray], margin: float) -> Fidelity:
    """`runner`'s decoder on `prefixes` (one per sequence of `fset`) against fp32: teacher-forced
    logits, and free-running greedy captions of the image prefixes (see `end_to_end`)."""
    result = compare(fset, decoder_logits(runner, prefixes, fset.ids), margin)
    pad = runner.manifest.model["pad_token_id"]
    equal, equal_clear = [], []
    for i, length in enumerate(fset.caption_lengths()):
        # Captions as generation makes them: up to and including EOS (within the forced length).
        reference = fset.ids[i][0].tolist()[:length]
        caption = strip_after_eos(greedy(runner, prefixes[i], fset.ids[i].shape[1], None, pad)[0], fset.eos, keep_eos=True)
        ties = np.flatnonzero(top2_margin(fset.reference[i][: len(reference)]) <= margin)
        clear_until = int(ties[0]) if ties.size else len(reference)
        equal.append(caption == reference)
        equal_clear.append(caption[:clear_until] == reference[:clear_until])
    return dataclasses.replace(
        result, captions_equal=float(np.mean(equal)), captions_equal_clear=float(np.mean(equal_clear)), caption_matches=tuple(equal)
    )


def nudged(fset: FidelitySet, draw: int) -> FidelitySet:
    """`fset` with every pixel value moved by one float32 ulp, up or down by a coin seeded by
    `draw` (draw 0: `fset` itself). fp32's tokens and logits stay those of the unmoved pixels.

    Why: a variant whose kernels quantize activations (MatMulNBits at accuracy level 4) is a step
    function of its input. Some of the ~10^5 activations each MatMul rounds sit at a rounding
    boundary, a one-ulp change flips them, and the flips cascade layer by layer: on the
    real-weights model, one ulp on every pixel moves the int8, uint8 and q4 vision encoders'
    outputs by 0.7–1.0 % (relative; a sample image, random pixels), about as far as the 8-bit
    ones are from fp32 — fp32's by 5–7e-7, fp16's by 4–7e-5 (bench/ulp_sensitivity.py). Another CPU kind's float kernels (or another onnxruntime, thread
    count or image decoder) differ from this one's by ulps, so they give another such draw: a
    table row measured once is one sample, and `end_to_end` on a few draws shows its spread.
    """
    if draw == 0:
        return fset
    up = np.random.default_rng(draw).random(fset.pixels.shape) < 0.5
    pixels = np.where(up, np.nextafter(fset.pixels, np.float32(np.inf)), np.nextafter(fset.pixels, np.float32(-np.inf)))
    return dataclasses.replace(fset, pixels=pixels.astype(np.float32))


def variant_prefixes(fset: FidelitySet, variant: Bundle) -> list[np.ndarray]:
    """The variant's own image prefixes of `fset`'s images, then `fset`'s text rows (no prefix)."""
    return [variant.prefix(fset.pixels[i : i + 1]) for i in range(fset.images)] + fset.prefixes[fset.images :]


def prefix_error(fset: FidelitySet, prefixes: list[np.ndarray]) -> float:
    """Mean over the images of ‖prefix − fp32's prefix‖ / ‖fp32's prefix‖."""
    pairs = zip(prefixes[: fset.images], fset.prefixes[: fset.images], strict=True)
    return float(np.mean([np.linalg.norm(got - ref) / np.linalg.norm(ref) for got, ref in pairs])) if fset.images else 0.0


def noisy_prefixes(fset: FidelitySet, relative: float, seed: int = 0) -> list[np.ndarray]:
    """fp32's image prefixes, each plus Gaussian noise of norm `relative` × its own norm (text rows
    unchanged). One draw per `seed`: two sizes with the same seed are the same noise, scaled."""
    rng = np.random.default_rng(seed)
    noisy = []
    for prefix in fset.prefixes[: fset.images]:
        noise = rng.standard_normal(prefix.shape).astype(np.float32)
        noisy.append(prefix + noise * np.float32(relative * np.linalg.norm(prefix) / np.linalg.norm(noise)))
    return noisy + fset.prefixes[fset.images :]


@dataclass(frozen=True)
class Sources:
    """Where a variant's end-to-end error comes from (`sources`).

    On the real-weights model a few image positions sit where a small perturbation of the prefix
    tips the decoder (knife edges): `noise` says what a random prefix error of the variant's size
    (one draw) costs fp32 itself — a yardstick for the encoders' share, not a bound on it.
    """

    prefix_error: float  # the variant's prefix_error
    decoder: Fidelity  # the variant's decoder on fp32's prefixes
    prefix: Fidelity  # fp32's decoder on the variant's prefixes
    noise: Mapping[float, Fidelity]  # scale → fp32's decoder on fp32's prefixes + Gaussian noise of scale × prefix_error


def sources(fset: FidelitySet, fp32: Bundle, variant: Bundle, margin: float, scales: tuple[float, ...] = (1.0,)) -> Sources:
    """The variant's decoder and its prefixes judged apart, and fp32 under random prefix noise
    of `scales` × the variant's prefix error (each judged by `judge`, captions included)."""
    own = variant_prefixes(fset, variant)
    error = prefix_error(fset, own)
    return Sources(
        prefix_error=error,
        decoder=judge(fset, variant, fset.prefixes, margin),
        prefix=judge(fset, fp32, own, margin),
        noise={scale: judge(fset, fp32, noisy_prefixes(fset, scale * error), margin) for scale in scales},
    )

"""The torch-free bundle layer: its tokenizer decodes as transformers does, its preprocessing
matches transformers' PIL processors (CLIP's shortest-edge resize and centre crop included) and
converts every PIL mode to the RGB a person sees (a 16-bit PNG captions like its 8-bit copy)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.preprocess import PREPROCESSOR_NAME, derive_preprocessor, load_preprocessor, open_image, to_rgb
from vlmexport.bundle.tokenizer import decode, load_tokenizer
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import load_checkpoint
from vlmexport.errors import BundleError, CheckpointError, ImageError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes"
CLIP_VISION = {"model_type": "clip_vision_model", "image_size": 32}
SIGLIP_VISION = {"model_type": "siglip_vision_model", "image_size": 32}


def noise(height: int, width: int, channels: int = 3, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# Tokenizer.


def _random_ids(vocab: int, specials: list[int], rows: int = 40, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        row = rng.integers(0, vocab, int(rng.integers(0, 24))).tolist()
        for s in specials:  # specials anywhere: first, inside, last
            row.insert(int(rng.integers(0, len(row) + 1)), s)
        out.append(row)
    return out


@pytest.mark.parametrize("which", ["example", "real"])
def test_bundle_tokenizer_decodes_like_transformers(which: str, request: pytest.FixtureRequest) -> None:
    folder = EXAMPLE / "model" if which == "example" else request.getfixturevalue("real_checkpoint")
    ours, reference = load_tokenizer(folder), PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    assert (ours.eos_token_id, ours.pad_token_id) == (reference.eos_token_id, reference.pad_token_id)
    specials = sorted(set(reference.all_special_ids))
    rows = _random_ids(len(reference), specials) + [[], specials]
    assert decode(ours, rows) == decode(reference, rows)
    for row in rows[:10]:
        assert ours.decode(row) == reference.decode(row, skip_special_tokens=False)


def test_bundle_tokenizer_cleans_up_spaces_when_its_config_asks_like_transformers(tmp_path: Path) -> None:
    from vlmexport.checkpoint.tokenizer import word_tokenizer

    word_tokenizer(["a", "cat", ".", ",", "'s", "n't", "?"]).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    ours, reference = load_tokenizer(tmp_path), PreTrainedTokenizerFast.from_pretrained(str(tmp_path), local_files_only=True)
    rows = _random_ids(len(reference), [0, 1], seed=3)
    assert ours.clean_up_spaces and decode(ours, rows) == decode(reference, rows)
    assert any("cat." in text or "a," in text for text in decode(ours, rows))  # the clean-up did something


def test_bundle_tokenizer_names_a_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read"):
        load_tokenizer(tmp_path)


# Preprocessing: CLIP's shortest edge and centre crop, as transformers does them.


@pytest.mark.parametrize(("height", "width"), [(45, 70), (70, 45), (33, 32), (32, 32)])
def test_derived_clip_preprocessing_matches_transformers_on_any_aspect_ratio(height: int, width: int) -> None:
    image = Image.fromarray(noise(height, width))
    ours = derive_preprocessor(CLIP_VISION)
    reference = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = reference(images=[image], return_tensors="np")["pixel_values"]
    assert ours([image]).shape == expected.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(ours([image]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        {"size": {"shortest_edge": 24}, "crop_size": {"height": 32, "width": 28}},  # crop larger than the image: zero padding
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 30, "width": 36}},  # not square
        {"size": 40, "crop_size": 32},  # transformers 4.x CLIP files: ints
    ],
)
def test_preprocessor_config_with_shortest_edge_and_crop_matches_transformers(tmp_path: Path, settings: dict) -> None:
    config = {"image_processor_type": "CLIPImageProcessor", "do_center_crop": True, "resample": 3, **settings}
    (tmp_path / PREPROCESSOR_NAME).write_text(json.dumps(config))
    image = Image.fromarray(noise(45, 70))
    ours = load_preprocessor(tmp_path, CLIP_VISION)
    expected = CLIPImageProcessorPil.from_pretrained(str(tmp_path))(images=[image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours([image]), expected, rtol=0, atol=1e-5)
    # Written back (export does), transformers reads the same steps.
    (tmp_path / PREPROCESSOR_NAME).write_text(json.dumps(ours.to_json()))
    again = CLIPImageProcessorPil.from_pretrained(str(tmp_path))(images=[image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours([image]), again, rtol=0, atol=1e-5)


def test_shortest_edge_without_a_crop_is_refused_naming_the_fix(tmp_path: Path) -> None:
    (tmp_path / PREPROCESSOR_NAME).write_text(json.dumps({"size": {"shortest_edge": 32}, "do_center_crop": False}))
    with pytest.raises(CheckpointError, match="do_center_crop"):
        load_preprocessor(tmp_path, CLIP_VISION)


# Preprocessing: image modes.


def _as_siglip(image: Image.Image) -> np.ndarray:
    return derive_preprocessor(SIGLIP_VISION)([image])


def test_sixteen_bit_grayscale_png_preprocesses_like_its_eight_bit_copy(tmp_path: Path) -> None:
    gray = noise(45, 70, 1)[..., 0]
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "wide.png")  # 16-bit: 0..65535
    Image.fromarray(gray, "L").save(tmp_path / "narrow.png")
    wide = open_image(tmp_path / "wide.png")
    with Image.open(tmp_path / "wide.png") as raw:
        assert raw.mode.startswith("I")  # Pillow really read it as 16-bit
    np.testing.assert_array_equal(np.asarray(wide), np.asarray(open_image(tmp_path / "narrow.png")))


@pytest.mark.parametrize("mode", ["P", "PA", "LA", "RGBa", "1", "I", "F", "YCbCr", "CMYK"])
def test_every_pil_mode_becomes_the_rgb_it_shows(mode: str) -> None:
    rgb = Image.fromarray(noise(20, 30))
    gray = rgb.convert("L")
    expected: Image.Image
    if mode == "I":
        image, expected = Image.fromarray(np.asarray(gray).astype(np.int32) * 257, "I"), gray.convert("RGB")
    elif mode == "F":
        image, expected = Image.fromarray(np.asarray(gray).astype(np.float32) / 255, "F"), gray.convert("RGB")
    elif mode in ("LA", "PA", "RGBa"):  # fully opaque: alpha changes nothing
        base = {"LA": gray, "PA": rgb.convert("P"), "RGBa": rgb}[mode]
        image = base.convert("RGBA" if mode == "RGBa" else mode)
        image.putalpha(255)
        image = image.convert(mode)
        expected = base.convert("RGB")
    else:
        image = rgb.convert(mode)
        expected = image.convert("RGB")
    got = to_rgb(image)
    assert got.mode == "RGB" and got.size == rgb.size
    np.testing.assert_allclose(np.asarray(got, np.int16), np.asarray(expected, np.int16), atol=1)


def test_transparent_palette_and_gray_alpha_are_composited_on_white() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10])
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    assert np.asarray(to_rgb(palette)).min() == 255
    gray_alpha = Image.merge("LA", [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 0)])
    assert np.asarray(to_rgb(gray_alpha)).min() == 255


def test_exif_orientation_is_applied_on_opening(tmp_path: Path) -> None:
    upright = Image.fromarray(noise(20, 30))
    stored = upright.transpose(Image.Transpose.ROTATE_270)  # what a camera writes, with Orientation=8 (turn 90° back)
    exif = Image.Exif()
    exif[0x0112] = 8
    stored.save(tmp_path / "rotated.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "rotated.png")), np.asarray(upright))


def test_a_decompression_bomb_is_an_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > twice the limit
    with pytest.raises(ImageError, match="too large"):
        open_image(tmp_path / "big.png")


def test_sixteen_bit_grayscale_png_captions_like_its_eight_bit_copy(tmp_path: Path) -> None:
    # The probe: the 16-bit copy of a picture was captioned "white triangle", its 8-bit copy "black triangle".
    checkpoint = load_checkpoint(EXAMPLE / "model")
    names = sorted(p.name for p in (EXAMPLE / "images").glob("*.png"))[:4]
    narrow, wide = [], []
    for name in names:
        gray = np.asarray(open_image(EXAMPLE / "images" / name).convert("L"))
        Image.fromarray(gray, "L").save(tmp_path / f"8-{name}")
        Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / f"16-{name}")
        narrow.append(open_image(tmp_path / f"8-{name}"))
        wide.append(open_image(tmp_path / f"16-{name}"))
    options = DecodeOptions(max_new_tokens=checkpoint.config.max_length)
    captions = [
        decode(load_tokenizer(EXAMPLE / "model"), generate_tokens(checkpoint.model, checkpoint.tokenizer, checkpoint.preprocessor(images), options))
        for images in (narrow, wide)
    ]
    assert captions[0] == captions[1] and all(captions[0]), captions


def test_bundle_preprocessor_needs_one_of_its_files(tmp_path: Path) -> None:
    from vlmexport.bundle.preprocess import bundle_preprocessor

    with pytest.raises(BundleError, match="re-run `vlmexport export`"):
        bundle_preprocessor(tmp_path)
    shutil.copy(EXAMPLE / "model" / "config.json", tmp_path / "config.json")
    assert bundle_preprocessor(tmp_path).height == json.loads((tmp_path / "config.json").read_text())["vision_config"]["image_size"]


def test_every_runtime_path_decodes_an_image_alike_exif_orientation_included(tmp_path: Path) -> None:
    """caption IMG (open_image), Captioner and Ray (bytes), and POST /caption decode through one
    loader: an EXIF-rotated photo is upright in all of them, and a format Pillow could open but
    the runtime refuses (EPS runs Ghostscript) is refused by all."""
    from vlmexport.bundle.preprocess import load_image
    from vlmexport.runtime.captioner import to_image
    from vlmexport.serve.images import decode as serve_decode

    image = Image.new("RGB", (30, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    data = path.read_bytes()
    opened = [open_image(path), load_image(data), to_image(data), to_image(str(path)), serve_decode(data)]
    assert {im.size for im in opened} == {(20, 30)}  # upright: the EXIF rotation applied
    first = np.asarray(opened[0], dtype=np.int16)
    assert all(np.array_equal(first, np.asarray(im, dtype=np.int16)) for im in opened[1:])
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(ImageError):
        load_image(eps)


def test_a_negative_seed_is_a_usage_error_not_a_numpy_traceback() -> None:
    from vlmexport.errors import UsageError

    with pytest.raises(UsageError, match="seed"):
        DecodeOptions(do_sample=True, seed=-1)

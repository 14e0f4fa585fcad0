"""Image preprocessing: from preprocessor_config.json, or derived from the vision config.

Written by hand (mode conversion → resize → centre crop → rescale → normalise, ~100 lines)
rather than through transformers' image processors because the browser runtime must repeat
exactly these steps from the same JSON, the runtime must not need transformers (nor torch),
and the transformers processors' default backend needs torchvision, which cannot be installed
beside this machine's CPU torch. Tests check this against transformers' PIL processors
(SigLIP and ViT's resize, CLIP's shortest-edge resize and centre crop, padding included).

Where transformers is wrong, this is not like it: PIL clips 16-bit and 32-bit grayscale to
0..255 when converting to RGB (a 16-bit PNG turns white), so those are scaled to 8 bits first;
EXIF orientation is applied on opening, as browsers do.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmexport.errors import BundleError, CheckpointError, ImageError

PREPROCESSOR_NAME = "preprocessor_config.json"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# What a browser or a camera writes; not every format Pillow can open (EPS, for one, runs Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Per vision model_type: (processor class name, mean, std, PIL resample, CLIP-style shortest-edge
# resize and centre crop). SigLIP and ViT resize straight to the square and normalise to [-1, 1];
# CLIP's processor keeps the aspect ratio and crops, with the OpenAI statistics.
DERIVED: dict[str, tuple[str, list[float], list[float], int, bool]] = {
    "siglip_vision_model": ("SiglipImageProcessor", [0.5] * 3, [0.5] * 3, Image.Resampling.BICUBIC, False),
    "vit": ("ViTImageProcessor", [0.5] * 3, [0.5] * 3, Image.Resampling.BILINEAR, False),
    "clip_vision_model": ("CLIPImageProcessor", CLIP_MEAN, CLIP_STD, Image.Resampling.BICUBIC, True),
}
# Integer grayscale modes: 16 bits per pixel (PNG's 16-bit grayscale opens as I;16, older Pillow
# and TIFF give I), scaled by 255/65535 to the 8 bits every other mode has.
WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        # A float image has no fixed range: [0, 1] if it fits there (the usual convention), else 0..255.
        values = values * 255 if np.nanmax(values, initial=0.0) <= 1.0 else values
    else:
        values = values * (255 / 65535)
    return Image.fromarray(np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode. Transparency is composited onto white, as transformers' image
    processors do (a plain `convert("RGB")` would expose whatever colour hides behind it);
    16-bit and float grayscale are scaled, not clipped (CMYK and the rest: Pillow's conversions)."""
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_GRAY or image.mode == "F":
        image = _to_8bit_gray(image)
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def shortest_edge_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) with the shorter side at `shortest_edge`, as transformers'
    `get_resize_output_image_size(default_to_square=False)` computes it (the long side truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' `center_crop` of an [H, W, C] array: the middle (height, width), the image
    first padded with zeros (centred, odd pixel after) wherever it is smaller than the crop."""
    orig_h, orig_w = pixels.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + height, left : left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros((new_h, new_w, *pixels.shape[2:]), pixels.dtype)
    top_pad, left_pad = -(-(new_h - orig_h) // 2), -(-(new_w - orig_w) // 2)
    padded[top_pad : top_pad + orig_h, left_pad : left_pad + orig_w] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


@dataclass(frozen=True)
class Preprocessor:
    """Resize (straight to (height, width), or CLIP-style: the shortest edge to `shortest_edge`
    and then centre-cropped to (height, width)), rescale, normalise; channels first, float32."""

    height: int  # of the output
    width: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    do_normalize: bool = True
    image_processor_type: str = "SiglipImageProcessor"
    shortest_edge: int | None = None  # set: aspect-keeping resize followed by a centre crop

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """Pixel values [batch, 3, height, width] float32."""
        return np.stack([self.one(image) for image in images])

    def one(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image)
        if self.shortest_edge is None:
            size = (self.width, self.height)
        else:
            size = shortest_edge_size(image.width, image.height, self.shortest_edge)
        pixels = np.asarray(image.resize(size, resample=Image.Resampling(self.resample)))
        if self.shortest_edge is not None:
            pixels = center_crop(pixels, self.height, self.width)
        pixels = pixels.astype(np.float32) * np.float32(self.rescale_factor)
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return pixels.transpose(2, 0, 1).astype(np.float32)

    def write(self, folder: Path) -> None:
        """Write these settings as `folder/preprocessor_config.json` (export and save do)."""
        (Path(folder) / PREPROCESSOR_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def to_json(self) -> dict[str, Any]:
        """The transformers preprocessor_config.json form of these settings."""
        resize: dict[str, Any] = {"size": {"height": self.height, "width": self.width}, "do_center_crop": False}
        if self.shortest_edge is not None:
            resize = {"size": {"shortest_edge": self.shortest_edge}, "do_center_crop": True, "crop_size": {"height": self.height, "width": self.width}}
        return {
            "image_processor_type": self.image_processor_type,
            "do_convert_rgb": True,
            "do_resize": True,
            **resize,
            "resample": self.resample,
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


def derive_preprocessor(vision_config: dict[str, Any]) -> Preprocessor:
    """The preprocessing a checkpoint without preprocessor_config.json was trained with: its
    processor class's defaults at the vision config's image size."""
    kind, mean, std, resample, crops = DERIVED.get(vision_config.get("model_type", ""), DERIVED["siglip_vision_model"])
    size = int(vision_config.get("image_size", 224))
    return Preprocessor(size, size, mean, std, resample=int(resample), image_processor_type=kind, shortest_edge=size if crops else None)


def _pair(value: Any) -> tuple[int, int] | None:
    """(height, width) of a transformers size value: an int, or {height, width}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    return None


def _geometry(data: dict[str, Any], path: Path, derived: Preprocessor) -> tuple[int, int, int | None]:
    """(height, width, shortest_edge) of a preprocessor_config.json.

    Raises:
        CheckpointError: a size form this runtime cannot reproduce exactly.
    """
    size, crop = data.get("size"), _pair(data.get("crop_size")) if data.get("do_center_crop") else None
    if size is None:
        return derived.height, derived.width, None
    # An int size with a centre crop is CLIP's older form of {shortest_edge} (its processors do not default to square).
    if (isinstance(size, dict) and set(size) == {"shortest_edge"}) or (isinstance(size, int) and crop is not None):
        edge = size if isinstance(size, int) else int(size["shortest_edge"])
        if crop is None:
            raise CheckpointError(
                f"{path}: size.shortest_edge without do_center_crop and crop_size gives images of varying size",
                "set do_center_crop with crop_size (as CLIP's processor does), or size {height, width}",
            )
        return crop[0], crop[1], edge
    pair = _pair(size)
    if pair is None:
        raise CheckpointError(f"{path}: size {size} is not supported", "use size {height, width}, an int, or {shortest_edge} with a centre crop")
    if crop is not None:
        # A resize to a fixed size, then a crop: the crop is the output, the resize a fixed step before it.
        raise CheckpointError(f"{path}: a centre crop after a fixed-size resize is not supported", "resize straight to the model's size, or use size {shortest_edge}")
    return pair[0], pair[1], None


def load_preprocessor(model_dir: Path, vision_config: dict[str, Any]) -> Preprocessor:
    """Read preprocessor_config.json if present, else derive it from the vision config.

    Raises:
        CheckpointError: the file exists but is not valid JSON, or asks for a resize not supported.
    """
    path = model_dir / PREPROCESSOR_NAME
    if not path.is_file():
        return derive_preprocessor(vision_config)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})", "delete it to derive preprocessing from the vision config") from exc
    derived = derive_preprocessor(vision_config)
    height, width, shortest_edge = _geometry(data, path, derived)
    return Preprocessor(
        height=height,
        width=width,
        image_mean=list(data.get("image_mean", derived.image_mean)),
        image_std=list(data.get("image_std", derived.image_std)),
        rescale_factor=float(data.get("rescale_factor", derived.rescale_factor)) if data.get("do_rescale", True) else 1.0,
        resample=int(data.get("resample", derived.resample)),
        do_normalize=bool(data.get("do_normalize", True)),
        image_processor_type=str(data.get("image_processor_type", derived.image_processor_type)),
        shortest_edge=shortest_edge,
    )


def bundle_preprocessor(bundle_dir: Path) -> Preprocessor:
    """The preprocessing written into a bundle (preprocessor_config.json), or derived from its config.json.

    Raises:
        BundleError: neither file is readable.
        CheckpointError: preprocessor_config.json is not valid JSON or not supported.
    """
    bundle_dir = Path(bundle_dir)
    try:
        vision_config = json.loads((bundle_dir / "config.json").read_text())["vision_config"]
        if not isinstance(vision_config, dict):
            raise ValueError("vision_config is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not (bundle_dir / PREPROCESSOR_NAME).is_file():
            raise BundleError(f"{bundle_dir} has neither {PREPROCESSOR_NAME} nor a config.json with a vision_config ({exc})", "re-run `vlmexport export`") from exc
        vision_config = {}
    return load_preprocessor(bundle_dir, vision_config)


def open_image(path: Path | str) -> Image.Image:
    """Open an image file as 8-bit RGB, turned upright by its EXIF orientation (see `load_image`).

    Raises:
        ImageError: missing file, not an image of an accepted format, or a decompression bomb.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image", "caption a folder with `--images DIR --output captions.jsonl`")
    if not path.is_file():
        raise ImageError(f"image {path} does not exist", "pass paths to existing image files")
    return load_image(path, str(path))


def image_names(folder: Path) -> list[str]:
    """Image files under `folder` (recursively, hidden ones skipped), as sorted relative POSIX paths."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_image(source: Path | bytes, what: str = "the bytes") -> Image.Image:
    """Decode an image file or its bytes as every runtime path does (CLI, Captioner, serve):
    only IMAGE_FORMATS, EXIF orientation applied, converted by `to_rgb`.

    Raises:
        ImageError: not an image of an accepted format, broken, or a decompression bomb.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what} is too large to decode safely ({exc})", "downscale the image first") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # SyntaxError: Pillow's "not a PNG file"
        raise ImageError(f"{what} is not a readable image ({exc.__class__.__name__})", f"pass a {', '.join(IMAGE_FORMATS)} file") from exc

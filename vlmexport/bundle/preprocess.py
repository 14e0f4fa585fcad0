"""Image preprocessing: from preprocessor_config.json, or derived from the vision config.

Written by hand (resize → rescale → normalise, ~40 lines) rather than through
transformers' image processors because the browser runtime must repeat exactly
these steps from the same JSON, and the transformers processors' default backend
needs torchvision, which cannot be installed beside this machine's CPU torch.
A test checks this against transformers' PIL processor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmexport.errors import CheckpointError, ImageError

PREPROCESSOR_NAME = "preprocessor_config.json"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Per vision model_type: (processor class name, mean, std, PIL resample). SigLIP and ViT
# normalise to [-1, 1]; CLIP uses the OpenAI statistics.
DERIVED: dict[str, tuple[str, list[float], list[float], int]] = {
    "siglip_vision_model": ("SiglipImageProcessor", [0.5] * 3, [0.5] * 3, Image.Resampling.BICUBIC),
    "vit": ("ViTImageProcessor", [0.5] * 3, [0.5] * 3, Image.Resampling.BILINEAR),
    "clip_vision_model": ("CLIPImageProcessor", CLIP_MEAN, CLIP_STD, Image.Resampling.BICUBIC),
}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' image processors make it: transparency is composited onto white
    (a plain `convert("RGB")` would drop alpha and expose whatever colour hides behind it)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocessor:
    """Resize to (height, width), rescale, normalise; channels first, float32."""

    height: int
    width: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    do_normalize: bool = True
    image_processor_type: str = "SiglipImageProcessor"

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """Pixel values [batch, 3, height, width] float32."""
        return np.stack([self.one(image) for image in images])

    def one(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image).resize((self.width, self.height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image, dtype=np.float32) * np.float32(self.rescale_factor)
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return pixels.transpose(2, 0, 1).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        """The transformers preprocessor_config.json form of these settings."""
        d = asdict(self)
        return {
            "image_processor_type": d["image_processor_type"],
            "do_convert_rgb": True,
            "do_resize": True,
            # CLIP's processor centre-crops by default; these settings resize straight to size.
            "do_center_crop": False,
            "size": {"height": self.height, "width": self.width},
            "resample": self.resample,
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


def derive_preprocessor(vision_config: dict[str, Any]) -> Preprocessor:
    """The preprocessing a checkpoint without preprocessor_config.json was trained with."""
    kind, mean, std, resample = DERIVED.get(vision_config.get("model_type"), DERIVED["siglip_vision_model"])
    size = int(vision_config.get("image_size", 224))
    return Preprocessor(size, size, mean, std, resample=int(resample), image_processor_type=kind)


def _size(data: dict[str, Any], fallback: int) -> tuple[int, int]:
    size = data.get("crop_size") if data.get("do_center_crop") else data.get("size")
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict):
        if "height" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    return fallback, fallback


def load_preprocessor(model_dir: Path, vision_config: dict[str, Any]) -> Preprocessor:
    """Read preprocessor_config.json if present, else derive it from the vision config.

    Raises:
        CheckpointError: the file exists but is not valid JSON.
    """
    path = model_dir / PREPROCESSOR_NAME
    if not path.is_file():
        return derive_preprocessor(vision_config)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})", "delete it to derive preprocessing from the vision config") from exc
    derived = derive_preprocessor(vision_config)
    height, width = _size(data, derived.height)
    return Preprocessor(
        height=height,
        width=width,
        image_mean=list(data.get("image_mean", derived.image_mean)),
        image_std=list(data.get("image_std", derived.image_std)),
        rescale_factor=float(data.get("rescale_factor", derived.rescale_factor)) if data.get("do_rescale", True) else 1.0,
        resample=int(data.get("resample", derived.resample)),
        do_normalize=bool(data.get("do_normalize", True)),
        image_processor_type=str(data.get("image_processor_type", derived.image_processor_type)),
    )


def open_image(path: Path | str) -> Image.Image:
    """Open any PIL-readable image as RGB.

    Raises:
        ImageError: missing file or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist", "pass paths to existing image files")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"{path} is not a readable image ({exc.__class__.__name__})", "pass a PNG, JPEG or other image file") from exc

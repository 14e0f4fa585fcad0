"""Uploaded images: formats allowed, size read from the header before anything is decoded.

A 641 KB PNG can declare 13000 × 13000 RGBA pixels: decoding it took 7.1 s and 3.0 GB on the
server this replaced, and a 30000 × 30000 header made PIL raise DecompressionBombError (a
500). The header gives the size for a few hundred bytes of reading, so the limit is checked
there, as a 413, before a pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from http import HTTPStatus

from PIL import Image, UnidentifiedImageError

from vlmexport.bundle.preprocess import IMAGE_FORMATS, load_image
from vlmexport.errors import ImageError
from vlmexport.serve.problems import RequestError

FORMATS = IMAGE_FORMATS
MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo passes; the demo model reads 224 × 224


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


def read_header(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageHeader:
    """Format and size from the image's header; nothing is decoded.

    Raises:
        RequestError: 400 not an image (of an accepted format), 413 over `max_pixels`.
    """
    if not data:
        raise RequestError(HTTPStatus.BAD_REQUEST, "empty image", "send a PNG, JPEG or other image file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is ours
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                header = ImageHeader(str(image.format), *image.size)
        except Image.DecompressionBombError:
            raise _too_many_pixels(None, max_pixels) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # SyntaxError: PIL's "not a PNG file"
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"the upload is not a readable image ({exc.__class__.__name__})", f"send a {', '.join(FORMATS)} file"
            ) from None
    if header.width * header.height > max_pixels:
        raise _too_many_pixels(header, max_pixels)
    return header


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image as 8-bit RGB, decoded by the runtime's one loader (bundle.preprocess.load_image:
    EXIF orientation, mode conversion) once `read_header` has passed it.

    Raises:
        RequestError: 400 if the data is broken beyond its header.
    """
    read_header(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is `max_pixels`, checked above
            return load_image(data, "the upload")
    except ImageError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, exc.problem, "send the whole, unbroken file") from None


def _too_many_pixels(header: ImageHeader | None, max_pixels: int) -> RequestError:
    size = f"{header.width} × {header.height} = {header.width * header.height / 1e6:.1f} megapixels" if header else "over 178 megapixels"
    return RequestError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"the image is {size}, over this server's {max_pixels / 1e6:g}-megapixel limit",
        "send a smaller image (the model reads it at a few hundred pixels a side)",
    )

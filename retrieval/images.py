"""Decoding images safely: every failure becomes :class:`BadImage`, never a crash or a half-read picture."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from retrieval.errors import BadImage

#: Extensions the folder reader picks up (lower case, with the dot).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: Default cap on decoded pixels (about 8k x 8k); larger images are refused as decompression bombs.
DEFAULT_MAX_PIXELS = 64_000_000


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Open, fully decode and convert an image to RGB.

    ``source`` is a path or the raw bytes of an encoded file. Raises :class:`BadImage` when the data is not an
    image, is truncated, or would decode to more than ``max_pixels`` pixels (checked on the full size).
    ``draft`` ``(width, height)``: a JPEG at least twice that size in both directions is decoded at 1/2, 1/4 or
    1/8 scale by the JPEG decoder itself (``Image.draft``), never below ``draft``: a 12 MP photo decodes ~13x
    faster when the encoder needs 224 px. Other formats ignore it.
    """
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise BadImage(f"cannot open {name}: {exc.strerror or exc}") from exc
    with fp, warnings.catch_warnings():
        # Pillow's own guard warns above 89 MP (and refuses above 179 MP): ``max_pixels`` is the limit here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"{name}: {width}x{height} exceeds the limit of {max_pixels} pixels")
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img.load()  # decode now: a truncated file fails here, not later in a worker
            return img.convert("RGB")
        except BadImage:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise BadImage(f"{name}: not a readable image ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadImage(f"{name}: corrupt or truncated image ({exc})") from exc

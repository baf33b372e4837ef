"""
The one image reader: the training loader (training/dataset.py) and `data.py check` both read every image through
read_rgb, so that check flags exactly the images training would skip, and neither misreads one.

    rgb = read_rgb("data/mine/images/0001.png")         # (H, W, 3) uint8, or ValueError naming the file

What it does with what PIL opens: 8-bit modes (L, P, 1, CMYK, YCbCr, ...) convert to RGB; 16-bit grey (I;16) is
scaled by its real range (65535 -> 255), not clipped to white; transparency (RGBA, LA, P with a transparent index) is
composited over white; the EXIF orientation is applied (coordinates are normalized on the image as a viewer shows it);
an animated image gives its first frame. Refused (ValueError, a counted skip in training, one problem in check): a
file PIL cannot open, a truncated one (decoded in full, never half-grey), 32-bit integer or float images (mode I, F:
no fixed range to convert by), and images of more than MAX_PIXELS pixels, refused from their header before decoding.
"""

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 64 * 2**20        # 8192 x 8192: decoding more would take GiBs per image (PIL warns only above ~89M)
SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")
NO_RANGE = {"I": "32-bit integer", "F": "32-bit float", "I;32": "32-bit integer"}
PROBLEMS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, MemoryError)


def _open(path):
    try:
        return Image.open(path)
    except PROBLEMS as e:       # name the image: PIL's messages often do not
        raise ValueError(f"image {path}: not an image PIL can read ({type(e).__name__}: {e})") from e


def _check_header(im, path) -> None:
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"image {path}: {w} x {h} = {w * h} pixels, more than {MAX_PIXELS} (decoding it would "
                         "take GiBs): downscale it")
    if im.mode in NO_RANGE:
        raise ValueError(f"image {path}: mode {im.mode} ({NO_RANGE[im.mode]}) has no fixed range to convert to "
                         "8-bit RGB by: save it as an 8- or 16-bit image")


def read_rgb(path, draft: int | None = None) -> np.ndarray:
    """The image at `path` as (H, W, 3) uint8, or a ValueError naming it and what is wrong (see the module
    docstring). draft: a JPEG may decode at the smallest scale still >= draft x draft (much faster)."""
    with _open(path) as im:
        _check_header(im, path)
        try:
            if draft:
                im.draft("RGB", (draft, draft))
            im.load()                                   # the whole file: a truncated one fails here
            im = ImageOps.exif_transpose(im)
            if im.mode in SIXTEEN:                      # 16-bit grey by its range, not clipped at 255
                grey = (np.asarray(im, dtype=np.uint16).astype(np.float32) / 257).round().astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
            return np.asarray(im.convert("RGB"))
        except PROBLEMS as e:
            raise ValueError(f"image {path}: {type(e).__name__}: {e}") from e

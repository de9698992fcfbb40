"""Pictures in and out for image models (a manifest `input_shape` of (H, W)), with Pillow.

Out: a batch of outputs becomes one greyscale PNG grid, near-square, cells apart by a grey line.
In: a PNG or JPEG upload becomes one instance: greyscale, resized to W x H, scaled to [0, 1] (or
the manifest's `input_range`), optionally inverted for dark ink on light paper.

Pure functions of bytes and arrays, no HTTP: payloads.py reads the form and negotiates `Accept`.
Only PNG and JPEG are decoded (`Image.open(formats=...)`), so an upload never reaches Pillow's
many other decoders.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from pydantic import Field

from app.common import Array
from app.errors import InvalidInputError, UnsupportedMediaTypeError
from app.schemas import Flag, Strict

MAX_SIDE = 4096  # pixels, both ways: what an upload may declare, and what a grid may become
# All of one request's uploads together: decoding costs about 50 ms per megapixel here, and a
# thread cannot be stopped by the request's timeout, so this bounds the work a request buys.
MAX_TOTAL_PIXELS = 4 * MAX_SIDE * MAX_SIDE
MAX_SCALE = 64  # a bound for the schema; MAX_SIDE is what really caps a grid
SEPARATOR = 2  # pixels between grid cells
SEPARATOR_GREY = 128  # visible against black backgrounds and white strokes alike
FORMATS = ("PNG", "JPEG")
# What the first bytes of a PNG and a JPEG are: such an upload that Pillow cannot open is
# damaged (422), anything else is another kind of file (415).
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")

Pixels = npt.NDArray[np.uint8]
ValueRange = tuple[float | None, float | None]


def is_image_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2


class UploadOptions(Strict):
    """The one option of an image upload that the .npy and JSON bodies do not have."""

    invert: Flag = Field(
        False,
        description="Invert the grey levels (255 - v) after the resize: for dark ink on light "
        "paper, when the model learnt light strokes on black, as MNIST models did.",
    )


class PngOptions(Strict):
    """Options of an `Accept: image/png` answer, given in the query string."""

    scale: int = Field(
        1,
        ge=1,
        le=MAX_SCALE,
        description="With Accept: image/png, draw each model pixel as scale x scale pixels "
        f"(nearest neighbour); the whole grid may be at most {MAX_SIDE} pixels either way.",
    )


# -- in ----------------------------------------------------------------------------------------


def read_images(
    files: Sequence[tuple[str, bytes]], shape: tuple[int, int], invert: bool = False
) -> Pixels:
    """(label, bytes) uploads as (N, H, W) grey levels; blocking, so call it off the event loop."""
    total = sum(_declared_pixels(data) for _, data in files)
    if total > MAX_TOTAL_PIXELS:
        raise InvalidInputError(
            f"The uploads declare {total / 1e6:.1f} megapixels together; one request may hold "
            f"{MAX_TOTAL_PIXELS / 1e6:.1f} at most, so send fewer or smaller images."
        )
    return np.stack([read_image(data, label, shape, invert) for label, data in files])


def _declared_pixels(data: bytes) -> int:
    """Width x height from the header alone; 0 where there is none to read (read_image then
    says what is wrong with the file)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
            return min(width * height, (MAX_SIDE + 1) ** 2)  # one huge file: read_image says so
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, SyntaxError,
            ValueError, EOFError):  # fmt: skip
        return 0


def read_image(data: bytes, label: str, shape: tuple[int, int], invert: bool = False) -> Pixels:
    """One upload as (H, W) grey levels 0..255, resized to the model's `shape`.

    `label` names the upload in every refusal, e.g. "file[0] (digit.png)". `invert` turns
    dark-on-light into light-on-dark, the way MNIST-style models saw their training data."""
    if not data:
        raise InvalidInputError(f"{label} is empty.")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
            # Before any pixel is decoded: a few bytes of PNG can declare gigapixels.
            if width > MAX_SIDE or height > MAX_SIDE:
                raise _too_large(label, width, height)
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise InvalidInputError(
                    f"{label} has {frames} frames; send one still image, not an animation."
                )
            h, w = shape
            if img.format == "JPEG":
                # Let the JPEG decoder scale down by up to 8 (and skip colour) as it decodes:
                # a big scan never exists at full size in memory.
                img.draft("L", (w, h))
            ImageOps.exif_transpose(img, in_place=True)  # phone photos: upright, as seen
            grey = _grey(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard, over ~89 megapixels, can fire in open() before our size check.
        raise InvalidInputError(
            f"{label} declares more pixels than the {MAX_SIDE} x {MAX_SIDE} this service reads."
        ) from None
    except UnidentifiedImageError:
        if data.startswith(SIGNATURES):
            raise _damaged(label) from None
        raise UnsupportedMediaTypeError(f"{label} is not a PNG or JPEG image.") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        # Pillow's spellings of a truncated or corrupt file (SyntaxError: "broken PNG file").
        raise _damaged(label) from None
    if grey.size != (w, h):
        # LANCZOS for quality; reducing_gap first box-reduces a large scan by an integer factor,
        # which is much faster and, at a gap of 3, indistinguishable.
        grey = grey.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    pixels = np.asarray(grey, dtype=np.uint8)  # (H, W)
    # Inverting the integers keeps it exact: 255 - v, not 1 - v/255 in floating point.
    return 255 - pixels if invert else pixels


def to_instances(images: Pixels, value_range: ValueRange) -> Array:
    """(N, H, W) grey levels to (N, H*W) float32 in [0, 1], or in the model's bounded range."""
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
    lo, hi = value_range
    if lo is not None and hi is not None and (lo, hi) != (0.0, 1.0):
        x = np.float32(lo) + x * np.float32(hi - lo)
    return x


def _grey(img: Image.Image) -> Image.Image:
    """Mode L, whatever the upload's mode."""
    if img.mode.startswith("I"):
        # 16-bit greys: Pillow's convert("L") clips them at 255 instead of scaling, so take the
        # top byte (65535 -> 255) ourselves.
        wide = np.asarray(img)  # uint16, or int32 for mode I
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Transparent pixels hold arbitrary colours (often black); show the image as a viewer
        # on a white page does, so what the person sees is what the model gets.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return img.convert("L")  # ITU-R 601-2 luma for colour images


def _too_large(label: str, width: int, height: int) -> InvalidInputError:
    return InvalidInputError(
        f"{label} is {width} x {height} pixels; the most this service reads is "
        f"{MAX_SIDE} x {MAX_SIDE}."
    )


def _damaged(label: str) -> InvalidInputError:
    return InvalidInputError(f"{label} is a damaged or truncated image.")


# -- out ---------------------------------------------------------------------------------------


def to_pixels(outputs: Array, shape: tuple[int, int], value_range: ValueRange) -> Pixels:
    """(N, D) outputs to (N, H, W) grey levels: the range [lo, hi] maps to 0..255, clipped.

    A Bernoulli model's range is [0, 1], so a pixel is round(255 * p). An unbounded side of the
    range (a Gaussian model) takes the batch's own minimum or maximum: one scale for the whole
    grid, so cells compare; a constant batch is black."""
    x = outputs.astype(np.float64).reshape(len(outputs), *shape)
    lo = float(x.min()) if value_range[0] is None else value_range[0]
    hi = float(x.max()) if value_range[1] is None else value_range[1]
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    # (x - 0) / 1 * 255 is exactly x * 255 in float64, so Bernoulli pixels match the JSON.
    scaled = (np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0
    return np.rint(scaled).astype(np.uint8)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols), near-square and never taller than wide: 5 -> (2, 3), 16 -> (4, 4)."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def grid_size(n: int, shape: tuple[int, int], scale: int, legend: bool = False) -> tuple[int, int]:
    """(width, height) in pixels of the grid of n cells of `shape`, each scaled up `scale` times,
    with a heat map's colour scale below it when `legend`."""
    rows, cols = grid_shape(n)
    h, w = shape
    width = cols * w * scale + (cols - 1) * SEPARATOR
    height = rows * h * scale + (rows - 1) * SEPARATOR
    if legend:
        return max(width, LEGEND_WIDTH), height + LEGEND_HEIGHT
    return width, height


def check_grid(n: int, shape: tuple[int, int], scale: int, legend: bool = False) -> None:
    """Refuse, before any work, a grid over MAX_SIDE pixels either way."""
    width, height = grid_size(n, shape, scale, legend)
    if width > MAX_SIDE or height > MAX_SIDE:
        raise InvalidInputError(
            f"{n} images at scale={scale} make a {width} x {height} PNG, over the "
            f"{MAX_SIDE} x {MAX_SIDE} limit; ask for fewer images or a smaller scale."
        )


def pair_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The cell of side_by_side: two images of `shape` with a separator between."""
    return shape[0], 2 * shape[1] + SEPARATOR


def side_by_side(left: Pixels, right: Pixels) -> Pixels:
    """(N, H, W[, 3]) twice -> (N, H, 2W + SEPARATOR[, 3]): each left image with its right one
    beside, grey levels or RGB alike."""
    gap = np.full((*left.shape[:2], SEPARATOR, *left.shape[3:]), SEPARATOR_GREY, dtype=np.uint8)
    return np.concatenate([left, gap, right], axis=2)


# The heat maps' colours: matplotlib's inferno, perceptually uniform and readable in grey too,
# from black (no more unlikely than normal data) through purple and orange to pale yellow (the
# grid's most anomalous pixel). scripts/colour_map.py writes the table.
HEAT_COLOURS: npt.NDArray[np.uint8] = np.load(Path(__file__).parent / "static" / "inferno.npy")
# The colour scale under a heat map: its height and the least width it needs for its labels.
LEGEND_HEIGHT, LEGEND_WIDTH = 28, 168
LEGEND_BAR = 8  # the bar's height, above its labels


def heat_colours(levels: Pixels) -> Pixels:
    """(...) heat levels 0..255 -> (..., 3) RGB in the heat map's colours."""
    coloured: Pixels = HEAT_COLOURS[levels]
    return coloured


def as_rgb(grey: Pixels) -> Pixels:
    return np.repeat(grey[..., None], 3, axis=-1)


@dataclass(frozen=True)
class Legend:
    """What the heat map's colours mean: its three labelled points, left to right."""

    labels: tuple[str, str, str]


def png_grid(cells: Pixels, scale: int = 1, legend: Legend | None = None) -> bytes:
    """(N, H, W) grey levels or (N, H, W, 3) RGB as one PNG: row-major cells, each upscaled by
    `scale` (nearest neighbour, so every model pixel stays a crisp square), with a heat map's
    colour scale below when given a `legend`. The same cells give the same bytes."""
    n, h, w = cells.shape[:3]
    _, cols = grid_shape(n)
    width, height = grid_size(n, (h, w), scale, legend is not None)
    # Unused cells of the last row stay separator-grey, so they cannot pass for a black image.
    canvas = np.full((height, width, *cells.shape[3:]), SEPARATOR_GREY, dtype=np.uint8)
    big = cells.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, H*scale, W*scale[, 3])
    step_y, step_x = h * scale + SEPARATOR, w * scale + SEPARATOR
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[r * step_y : r * step_y + h * scale, c * step_x : c * step_x + w * scale] = big[i]
    image = Image.fromarray(canvas)  # a 2-D uint8 array is mode L, (H, W, 3) is RGB
    if legend is not None:
        _draw_legend(image, legend)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _draw_legend(image: Image.Image, legend: Legend) -> None:
    """The colour bar across the foot of the image, its ends and middle labelled below it."""
    width, height = image.size
    top = height - LEGEND_HEIGHT + 4
    bar = HEAT_COLOURS[np.linspace(0, 255, width).round().astype(int)]  # (W, 3)
    image.paste(Image.fromarray(np.repeat(bar[None], LEGEND_BAR, axis=0)), (0, top))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=10)
    for label, anchor, x in zip(legend.labels, ("la", "ma", "ra"), (0, width // 2, width - 1),
                                strict=True):  # fmt: skip
        draw.text((x, top + LEGEND_BAR + 2), label, fill=(255, 255, 255), font=font, anchor=anchor)

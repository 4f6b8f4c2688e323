"""Image files: finding them, checking them before they are decoded, and decoding them one way for every tool.

Training, evaluation, prediction and the filters script all go through here, so they read the same files and see
the same pixels:

- `find_images` lists the image files under a folder;
- `read_header` reads a file's size and EXIF orientation from its header (Pillow; no pixel is decoded);
- `scan_images` checks every file of a folder source once (header, pixel budget, a decode at the scale training
  decodes at) and remembers the result;
- `decode_and_resize` decodes JPEG at a reduced scale where that still covers the image size, turns the image as
  its EXIF orientation says (phone photos are stored sideways), and resizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from cnnlab.console import held_native_stderr
from cnnlab.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
EXIF_ORIENTATION = 0x0112


# ---------------------------------------------------------------------------------------------------------------
# Finding files


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.walk hands bytes that are not UTF-8 over as lone surrogates
        return False


def find_images(folder: str) -> tuple[list[str], list[str]]:
    """The image files anywhere under `folder` (sub-folders too; hidden ones skipped), sorted, and the files left
    out: hidden ones, other extensions, and names that are not UTF-8 (TensorFlow takes paths as UTF-8 strings)."""
    images, left_out = [], []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = os.path.join(root, name)
            usable = not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS) and _utf8(path)
            (images if usable else left_out).append(path)
    return sorted(images), sorted(left_out, key=lambda p: p.encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------------------------------------------------------
# Headers: size, orientation, and what a decode would cost


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding its pixels."""

    width: int
    height: int
    format: str        # Pillow's name: JPEG, PNG, BMP, GIF, MPO (a phone's multi-picture JPEG) ...
    orientation: int   # EXIF orientation, 1 (as stored) to 8; 1 when there is none


def read_header(path: str) -> ImageHeader | None:
    """The header of an image file, or None when it is not one Pillow recognises."""
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # this is not a decode; `decoded_pixels` against the budget is the check
    try:
        with Image.open(path) as image:
            width, height = image.size
            fmt = image.format or ""
            orientation = 1
            # JPEG keeps EXIF in its header. Pillow finds a PNG's only by decoding the whole file (a bomb, too), and
            # cameras and phones write JPEG: other formats are taken as stored.
            if fmt in ("JPEG", "MPO"):
                try:
                    orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
                except Exception:  # a damaged EXIF block: the pixels may still be fine
                    pass
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return ImageHeader(width, height, fmt, orientation if 1 <= orientation <= 8 else 1)


def jpeg_scale(height: int, width: int, image_size: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) a JPEG of this size is decoded at for `image_size`: the largest that still
    covers it. The same rule as `decode_scaled`, in Python."""
    room = min(height // image_size[0], width // image_size[1])
    return 8 if room >= 8 else 4 if room >= 4 else 2 if room >= 2 else 1


def decoded_pixels(header: ImageHeader, image_size: tuple[int, int]) -> int:
    """Pixels the decoder will produce for this file: a JPEG at its reduced scale, anything else in full."""
    if header.format in ("JPEG", "MPO"):
        size = image_size[::-1] if header.orientation >= 5 else image_size
        scale = jpeg_scale(header.height, header.width, size)
        return -(-header.height // scale) * -(-header.width // scale)
    return header.height * header.width


def over_budget(header: ImageHeader, image_size: tuple[int, int], max_megapixels: float) -> bool:
    """Whether decoding the file would produce more than `max_megapixels` (`data.max_image_megapixels`): a
    decompression bomb, or a huge PNG, is refused before it takes memory."""
    return decoded_pixels(header, image_size) > max_megapixels * 1e6


# ---------------------------------------------------------------------------------------------------------------
# Decoding


# The headers of a 1x1 JPEG (start of image, frame, scan, end): all extract_jpeg_shape reads.
_TINY_JPEG = (b"\xff\xd8" b"\xff\xc0\x00\x11\x08\x00\x01\x00\x01\x03\x01\x11\x00\x02\x11\x00\x03\x11\x00"
              b"\xff\xda\x00\x0c\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00" b"\xff\xd9")


def decode_scaled(contents: tf.Tensor, image_size) -> tf.Tensor:
    """Decodes JPEG, PNG, BMP or GIF bytes to uint8 RGB. A JPEG is decoded at 1/1, 1/2, 1/4 or 1/8 scale (libjpeg's
    DCT scaling), the smallest that still covers `image_size`: far cheaper than a full decode, an averaging rather
    than a skipping of pixels, and the only way to read a photo over ~180 megapixels (TensorFlow refuses to
    decode one in full)."""
    is_jpeg = tf.io.is_jpeg(contents)
    # extract_jpeg_shape fails on other formats, so it reads a stand-in header for them.
    shape = tf.image.extract_jpeg_shape(tf.where(is_jpeg, contents, _TINY_JPEG))
    room = tf.minimum(shape[0] // image_size[0], shape[1] // image_size[1])
    scale = tf.cast(room >= 2, tf.int32) + tf.cast(room >= 4, tf.int32) + tf.cast(room >= 8, tf.int32)
    # One flat switch rather than a cond around a switch: each level of branching is a function call per image.
    branch = tf.where(is_jpeg, scale, 4)
    return tf.switch_case(branch, [
        *(lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r) for r in (1, 2, 4, 8)),
        lambda: tf.ensure_shape(tf.io.decode_image(contents, channels=3, expand_animations=False), [None, None, 3]),
    ])


# EXIF orientation 1-8 as a transpose (5-8) followed by left-right and/or up-down flips: 2 mirrored, 3 upside down,
# 4 mirrored upside down, 5 transposed, 6 stored turned anticlockwise, 7 transversed, 8 stored turned clockwise.
# NumPy, not tf.constant: a tensor made at import would start TensorFlow's runtime before a multi-worker strategy
# can configure its collectives.
_ORIENT_PERM = np.array([[0, 1, 2]] * 4 + [[1, 0, 2]] * 4, np.int32)
_ORIENT_FLIPS = np.array([[False, False], [True, False], [True, True], [False, True],
                          [False, False], [True, False], [True, True], [False, True]])  # [left-right, up-down]


def apply_orientation(image: tf.Tensor, orientation) -> tf.Tensor:
    """Turns a decoded image as its EXIF orientation (1-8) says, so it stands as a photo viewer shows it.

    Table lookups rather than a switch: it runs on every image of the input pipeline, and a branch per image cost a
    third of the decoding rate (measured), where these ops on an upright image cost nothing measurable."""
    index = tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7)
    image = tf.transpose(image, tf.gather(_ORIENT_PERM, index))
    return tf.reverse(image, tf.boolean_mask(np.array([1, 0], np.int32), tf.gather(_ORIENT_FLIPS, index)))


def resize_decoded(image: tf.Tensor, image_size) -> tf.Tensor:
    """Resizes an already decoded image (as TFDS gives) to a uint8 RGB image of `image_size`."""
    if image.shape.rank == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    # Bilinear weights are a convex combination, so the result stays in [0, 255]: rounding is all the cast needs.
    return tf.cast(tf.round(tf.image.resize(image, image_size)), tf.uint8)


def decode_and_resize(contents: tf.Tensor, image_size, orientation=1) -> tf.Tensor:
    """Decodes JPEG, PNG, BMP or GIF bytes (whatever the file is called) to a uint8 RGB image of `image_size`,
    turned upright by its EXIF `orientation` (from `read_header`; TensorFlow's decoders ignore EXIF)."""
    transposed = tf.cast(orientation, tf.int32) >= 5
    stored_size = tf.where(transposed, tf.constant(image_size[::-1]), tf.constant(image_size))
    image = apply_orientation(decode_scaled(contents, stored_size), orientation)
    return resize_decoded(image, image_size)


class UnreadableImage(UserError):
    """A file `read_image` will not read: `reason` says why (not an image, or over the pixel budget)."""

    NOT_AN_IMAGE = "is not a readable image (JPEG, PNG, BMP or GIF)"

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} {reason}")
        self.path, self.reason = path, reason


def read_image(path: str, image_size: tuple[int, int], max_megapixels: float) -> np.ndarray:
    """One image file, checked, decoded, turned upright and resized, as uint8 (the way training reads it).

    Raises:
        UnreadableImage: not a readable image, or over the pixel budget (`data.max_image_megapixels`).
    """
    header = read_header(path)
    if header is None:
        raise UnreadableImage(path, UnreadableImage.NOT_AN_IMAGE)
    if over_budget(header, image_size, max_megapixels):
        raise UnreadableImage(path, f"would decode to {decoded_pixels(header, image_size) / 1e6:.0f} megapixels, "
                                    f"over data.max_image_megapixels ({max_megapixels:g})")
    try:
        with held_native_stderr():
            return decode_and_resize(tf.io.read_file(path), image_size, header.orientation).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        raise UnreadableImage(path, UnreadableImage.NOT_AN_IMAGE) from None


# ---------------------------------------------------------------------------------------------------------------
# Scanning a folder source before training


@dataclass
class Scan:
    """What `scan_images` found: the files it leaves out (and why), and each kept file's EXIF orientation."""

    undecodable: list[str]
    over_budget: list[str]
    orientation: dict[str, int]

    @property
    def left_out(self) -> set[str]:
        return set(self.undecodable) | set(self.over_budget)


def scan_cache_dir() -> Path:
    """Where image-scan results are kept: $XDG_CACHE_HOME/cnnlab/scans (data folders may be read-only)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnlab" / "scans"


SCAN_VERSION = 2  # bump when what the scan checks changes, so that older results are not trusted


def scan_images(paths: list[str], image_size: tuple[int, int], max_megapixels: float) -> Scan:
    """Checks every file the way training will read it, once per change of the file.

    Each file's header is read (size, EXIF orientation), files over the pixel budget are left out undecoded, and the
    rest are decoded in parallel at the scale training decodes them at, so the scan accepts exactly what training
    can read. Results are cached by path, size and modification time (per image size), so a second scan of an
    unchanged folder only stats the files.
    """
    if not paths:
        return Scan([], [], {})
    root = os.path.commonpath([os.path.abspath(p) for p in paths])
    key = f"{SCAN_VERSION}:{root}:{image_size[0]}x{image_size[1]}"
    cache_file = scan_cache_dir() / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    # Per file: [size, mtime, header fields (None: not an image), decodes (None: not tried, being over the budget)].
    # The budget is applied at every scan, so changing it needs no rescan, and a file over it is never decoded.
    changed = False
    for p in paths:
        st = os.stat(p)
        stamp = [st.st_size, st.st_mtime_ns]
        if cache.get(p, [None, None])[:2] != stamp:
            header = read_header(p)
            fields = [header.width, header.height, header.format, header.orientation] if header else None
            cache[p], changed = stamp + [fields, None], True
    to_decode = [p for p in paths if cache[p][2] and cache[p][3] is None
                 and not over_budget(ImageHeader(*cache[p][2]), image_size, max_megapixels)]
    good = _decodes(to_decode, [cache[p][2][3] for p in to_decode], image_size)
    for p in to_decode:
        cache[p][3] = p in good
    if changed or to_decode:
        with contextlib.suppress(OSError):  # an unwritable cache only costs a re-scan next time
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
    scan = Scan([], [], {})
    for p in paths:
        fields, decodes = cache[p][2], cache[p][3]
        header = ImageHeader(*fields) if fields else None
        if header is not None and over_budget(header, image_size, max_megapixels):
            scan.over_budget.append(p)
        elif not decodes:
            scan.undecodable.append(p)
        else:
            scan.orientation[p] = header.orientation
    return scan


def _decodes(paths: list[str], orientations: list[int], image_size: tuple[int, int]) -> set[str]:
    """The files among `paths` that `decode_and_resize` reads without an error."""
    if not paths:
        return set()
    ds = tf.data.Dataset.from_tensor_slices((paths, orientations))
    ds = ds.map(lambda p, o: (p, tf.shape(decode_and_resize(tf.io.read_file(p), image_size, o))),
                num_parallel_calls=AUTOTUNE, deterministic=False).ignore_errors()
    # TensorFlow's decoders log a line per broken file ("Premature end of JPEG data") at a level its log settings
    # do not hide; the scan reports those files itself, once.
    with held_native_stderr():
        return {p.decode() for p, _ in ds.as_numpy_iterator()}

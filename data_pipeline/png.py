"""Deterministic 8-bit grayscale PNG: the image format inside the shards.

Encoded here with zlib at a fixed level (PNG spec, ISO/IEC 15948, sections 5 and 11: signature,
IHDR, IDAT, IEND; filter 0) so that identical images give identical bytes whatever PIL's version.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

__all__ = ["MAX_PIXELS", "PNG_ZLIB_LEVEL", "encode_png_gray", "decode_png_gray"]

# Level 6 (zlib default), not 9: tar pads each ~300-byte PNG to 512 bytes anyway, so 9 saves
# no disk and costs ~1 s per 70k images.
PNG_ZLIB_LEVEL = 6
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The largest image decode_png_gray inflates when no shape is given (16 megapixels, 16 MB as "L"); the
# loaders ask for exactly 28x28. The header is checked before PIL sees the bytes, so PIL's process-wide
# Image.MAX_IMAGE_PIXELS (which other libraries share) is left as it is.
MAX_PIXELS = 1 << 24


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png_gray(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) image as a deterministic 8-bit grayscale PNG.

    Written by hand rather than with PIL so the bytes depend only on zlib's output at a fixed level,
    not on PIL's version or its encoder options.

    Args:
        image: uint8 (H, W).

    Returns:
        PNG file bytes (no ancillary chunks, no timestamps).
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"encode_png_gray needs a uint8 (H, W) image, got {image.dtype} {image.shape}")
    height, width = image.shape
    # Filter type 0 (None) per scanline: simplest, and decode_png_gray's fast path relies on it.
    rows = np.zeros((height, width + 1), dtype=np.uint8)
    rows[:, 1:] = image
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_ZLIB_LEVEL))
        + _png_chunk(b"IEND", b"")
    )


def decode_png_gray(data: bytes, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an 8-bit grayscale PNG to uint8 (H, W), checking every chunk CRC.

    Fast path for the PNGs ``encode_png_gray`` writes (one pass of zlib, no PIL); any other
    valid PNG (filters other than 0, other colour types) goes through PIL and is converted
    to 8-bit grayscale ("L").

    The size the header declares is checked before any pixel is inflated: a PNG that declares
    more than ``MAX_PIXELS`` (or, with ``shape``, any other size) is refused from its 13-byte
    IHDR, so a decompression bomb or an oversized image never costs more than its file.

    Args:
        data: the PNG file bytes.
        shape: the (H, W) the image must have; None accepts any size up to ``MAX_PIXELS``.

    Raises:
        ValueError: the bytes are not a valid PNG (bad signature, CRC, size or zlib stream),
            its declared size differs from ``shape`` or exceeds ``MAX_PIXELS``, or PIL cannot
            decode it.
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    pos = len(_PNG_SIGNATURE)
    ihdr = b""
    idat = []
    while True:
        if pos + 8 > len(data):
            raise ValueError("PNG truncated before IEND")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ValueError(f"PNG chunk {kind!r} truncated")
        payload = data[pos + 8 : end]
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(kind + payload) != crc:
            raise ValueError(f"PNG chunk {kind!r} fails its CRC (corrupt bytes)")
        if kind == b"IHDR":
            ihdr = payload
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
        pos = end + 4
    if len(ihdr) != 13:
        raise ValueError("PNG has no valid IHDR chunk")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    _check_declared_size(width, height, shape)
    if depth == 8 and colour == 0 and interlace == 0:
        expected = height * (width + 1)
        # Bounded inflate: a stream that would inflate past the declared size stops there.
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(b"".join(idat), expected + 1)
        except zlib.error as exn:
            raise ValueError(f"PNG image data is corrupt: {exn}") from exn
        if len(raw) != expected:
            raise ValueError(f"PNG image data is {len(raw)}+ bytes, expected {expected}")
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width + 1)
        if not rows[:, 0].any():
            return rows[:, 1:].copy()
    return _decode_with_pil(data, (height, width))


def _check_declared_size(width: int, height: int, shape: tuple[int, int] | None) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"PNG declares an empty image ({width}x{height})")
    if shape is not None and (height, width) != tuple(shape):
        raise ValueError(f"image is {width}x{height} (width x height), expected {shape[1]}x{shape[0]}")
    if width * height > MAX_PIXELS:
        raise ValueError(f"PNG declares {width}x{height} pixels, more than the {MAX_PIXELS} this reader accepts")


def _decode_with_pil(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """PNGs that other tools wrote: opened lazily, size checked again before ``load()``."""
    # optional: PIL only for PNGs that other tools wrote (ours decode with zlib alone, in the loader's hot path)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if (img.height, img.width) != shape or img.width * img.height > MAX_PIXELS:
                raise ValueError(
                    f"PIL reads the PNG as {img.width}x{img.height}, its header said {shape[1]}x{shape[0]}"
                )
            img.load()
            return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    except ValueError:
        raise
    except Exception as exn:  # PIL raises OSError, SyntaxError, DecompressionBombError, EOFError, ...
        raise ValueError(f"undecodable PNG: {type(exn).__name__}: {str(exn)[:200]}") from None

"""Images of API requests: base64 `data:` URLs always, local files and http(s) URLs only when the server allows
them; every image is size-checked before it is decoded.

A decompression bomb (a small file that claims a huge canvas) is refused from its header: PIL reads the
size without decoding the pixels, and anything over `max_pixels` is never decoded.
"""
from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .protocol import APIError, bad_request

REMOTE_TIMEOUT_S = 10.0


@dataclass
class ImagePolicy:
    """max_pixels: width x height above which an image is refused; max_bytes: largest encoded image;
    local_root: the folder local paths may name (None: no local files); allow_remote: fetch http(s) URLs."""
    max_pixels: int = 25_000_000
    max_bytes: int = 20 * 2**20
    local_root: Path | None = None
    allow_remote: bool = False


def load_image_url(url: str, policy: ImagePolicy, where: str) -> Image.Image:
    """An image_url's URL -> decoded RGB image; APIError(400) naming `where` for anything refused or broken."""
    if url.startswith("data:"):
        data = _data_url_bytes(url, where)
    elif url.startswith(("http://", "https://")):
        data = _remote_bytes(url, policy, where)
    else:
        data = _local_bytes(url, policy, where)
    if len(data) > policy.max_bytes:
        raise bad_request(f"{where}: the image is {len(data)} bytes, more than the limit of {policy.max_bytes}")
    return decode_image(data, policy.max_pixels, where)


def decode_image(data: bytes, max_pixels: int, where: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
                if width * height > max_pixels:
                    raise bad_request(f"{where}: the image is {width}x{height} = {width * height} pixels, more than "
                                      f"the limit of {max_pixels} (--max-image-pixels); it was not decoded",
                                      code="image_too_large")
                image.load()
                return image.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise bad_request(f"{where}: refused as a decompression bomb ({err})", code="image_too_large") from None
    except UnidentifiedImageError:
        raise bad_request(f"{where}: the data is not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt files
        raise bad_request(f"{where}: cannot decode the image ({err})") from None


def _data_url_bytes(url: str, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise bad_request(f"{where}: a data URL needs a comma before its data")
    media_type, *params = header[len("data:"):].split(";")
    if not media_type.lower().startswith("image/"):
        raise bad_request(f"{where}: the data URL is {media_type or 'text/plain'!r}, not an image (data:image/...)")
    if "base64" not in params:
        raise bad_request(f"{where}: image data URLs must be base64 (data:{media_type};base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data URL's base64 is invalid") from None


def _remote_bytes(url: str, policy: ImagePolicy, where: str) -> bytes:
    if not policy.allow_remote:
        raise bad_request(f"{where}: http(s) image URLs are refused; send the image as a base64 data URL, or start "
                          f"the server with --allow-remote-images")
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise bad_request(f"{where}: cannot fetch {url} ({getattr(err, 'reason', err)})") from None
    return data


def _local_bytes(url: str, policy: ImagePolicy, where: str) -> bytes:
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"{where}: file URLs must name a local path (file:///...)")
        spec = unquote(parsed.path)
    elif "://" in url:
        raise bad_request(f"{where}: unsupported image URL scheme {url.split('://', 1)[0]!r} (data:, or http(s) "
                          f"with --allow-remote-images)")
    else:
        spec = url
    if policy.local_root is None:
        raise bad_request(f"{where}: local image paths are refused; send the image as a base64 data URL, or start "
                          f"the server with --allow-local-files DIR")
    root = policy.local_root.resolve()
    path = (root / spec).resolve()  # an absolute spec replaces root; links are followed before the check
    if path != root and root not in path.parents:
        raise bad_request(f"{where}: {spec!r} is outside the folder the server shares (--allow-local-files)")
    if not path.is_file():
        raise bad_request(f"{where}: no such image file {spec!r} in the shared folder")
    if path.stat().st_size > policy.max_bytes:
        raise bad_request(f"{where}: {spec!r} is {path.stat().st_size} bytes, more than the limit of "
                          f"{policy.max_bytes}")
    return path.read_bytes()

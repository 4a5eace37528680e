"""Image loading and preprocessing with the vision tower's own size and normalisation."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ..errors import InputError

ASPECT_MODES = ("pad", "square", "resize")


class ImageProcessor:
    """PIL image -> (3, S, S) float tensor.

    aspect_ratio: `pad` (LLaVA-1.5: pad to a square with the mean colour, then resize), `square`
    (resize the short side and centre-crop, the CLIP default), `resize` (squash to S×S).
    """

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], aspect_ratio: str = "pad"):
        if aspect_ratio not in ASPECT_MODES:
            raise ValueError(f"--image_aspect_ratio {aspect_ratio!r}: choose one of {ASPECT_MODES}")
        self.image_size, self.mean, self.std, self.aspect_ratio = image_size, tuple(mean), tuple(std), aspect_ratio
        resize = ([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(image_size)]
                  if aspect_ratio == "square" else
                  [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)])
        self.transform = T.Compose([T.ToImage(), *resize, T.ToDtype(torch.float32, scale=True),
                                    T.Normalize(self.mean, self.std)])

    @classmethod
    def for_tower(cls, vision_tower, aspect_ratio: str = "pad") -> "ImageProcessor":
        return cls(vision_tower.image_size, vision_tower.image_mean, vision_tower.image_std, aspect_ratio)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.aspect_ratio == "pad":
            image = pad_to_square(image, tuple(int(255 * m) for m in self.mean))
        return self.transform(image)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# Whether image paths may leave their folder (absolute paths, symlinks out): set once per process from
# --allow_images_outside_folder (training) so every loader of the run applies the same rule.
_images_may_leave_folder = False


def allow_images_outside_folder(allowed: bool) -> None:
    """The process-wide default of resolve_image_path's `allow_outside` (training sets it from its flag)."""
    global _images_may_leave_folder
    _images_may_leave_folder = bool(allowed)


class ImageError(InputError):
    """An image that is refused: outside its folder, not a regular file, or too large to decode safely."""


OUTSIDE_HINT = "pass --allow_images_outside_folder to allow it"


def resolve_image_path(image: str, image_folder: str | Path | None, allow_outside: bool | None = None) -> Path:
    """The file a record's image path names, which must stay inside --image_folder (the current directory when
    none is given). Returns the resolved path: the file that was checked is the file that is opened.

    Refused (ImageError): absolute paths, `../` components and symlinks whose target lies outside the folder. The
    folder itself may be a symlink (resolved first: `--image_folder data` -> /datasets/coco is fine), but a symlink
    inside it to elsewhere is refused like an absolute path: the data file and the folder's contents may come from
    a download, the user's other files do not. `allow_outside` (default: allow_images_outside_folder's setting,
    False) opts out: paths are then joined and used as written.
    """
    allow_outside = _images_may_leave_folder if allow_outside is None else allow_outside
    path = Path(image)
    if allow_outside:
        return path if image_folder is None or path.is_absolute() else Path(image_folder) / path
    named = f"--image_folder {str(image_folder)!r}" if image_folder is not None else "the current directory"
    if path.is_absolute():
        raise ImageError(f"image path {image!r} is absolute: images must be inside {named} ({OUTSIDE_HINT})")
    folder = Path(os.path.realpath(image_folder if image_folder is not None else "."))
    full = Path(os.path.realpath(folder / path))
    if full != folder and folder not in full.parents:
        how = "leaves" if ".." in path.parts else "is a symlink out of"
        raise ImageError(f"image path {image!r} {how} {named} (to {full}; {OUTSIDE_HINT})")
    return full


# Pillow's own bomb limit (it warns above it and refuses above twice it); we refuse above it, with a message.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # replaced by ImageError below


def load_image(path: str | Path | BinaryIO) -> Image.Image:
    """Open and fully decode an image (raises on truncated or undecodable files).

    ImageError for a path that is not a regular file (a FIFO or device would block or never end) and for images of
    more than MAX_IMAGE_PIXELS pixels, checked from the header before anything is decoded (decompression bombs)."""
    name = path if isinstance(path, (str, Path)) else "image"
    if isinstance(path, (str, Path)) and Path(path).exists() and not Path(path).is_file():
        raise ImageError(f"{path}: not a regular file")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{name}: {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed "
                                 f"(a decompression bomb?)")
            img.load()
            return img.convert("RGB")
    except Image.DecompressionBombError as err:  # Pillow's own check, before the header is ours to read
        raise ImageError(f"{name}: {err}") from None

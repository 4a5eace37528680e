"""Image loading and preprocessing with the vision tower's own size and normalisation."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2 as T

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


def resolve_image_path(image: str, image_folder: str | Path | None) -> Path:
    """Join a record's relative image path to --image_folder, refusing paths that leave the folder.

    The check is on the path as written ("../" components), not on resolved symlinks: image folders
    are often links to where a dataset really lives (LLaVA's playground/data/coco -> /datasets/coco).
    """
    path = Path(image)
    if image_folder is None or path.is_absolute():
        return path
    folder = Path(os.path.abspath(image_folder))
    full = Path(os.path.normpath(folder / path))
    if folder != full and folder not in full.parents:
        raise ValueError(f"image path {image!r} leaves --image_folder {str(image_folder)!r}")
    return full


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image (raises on truncated or undecodable files)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")

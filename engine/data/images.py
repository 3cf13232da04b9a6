"""InternVL3 image processing: dynamic tiling around transformers' GotOcr2 image processor.

An image becomes `num_tiles` square tiles of `tile_size` pixels (the best grid up to `max_tiles`, plus a
thumbnail when the grid has more than one tile), normalised with the ImageNet mean/std. Each tile costs
`tokens_per_tile` `<IMG_CONTEXT>` tokens in the sequence, a number that comes from the model config so the
data side and the model always agree.

The PIL backend of the transformers processor is used on purpose: it needs no torchvision (which has no
CPU wheel next to the pinned CPU torch) and gives the same tiles as the fast backend.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from engine.vocab import tile_size_from_config, tokens_per_tile_from_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # (num_tiles, 3, tile_size, tile_size), float32
    num_tiles: int
    num_image_tokens: int


class ImageProcessor:
    """Turns an image (path or PIL image) into InternVL tiles and says how many image tokens they need.

    Thread- and process-safe: data loader workers each call it on their own images (it pickles, for workers
    started by spawn or forkserver); `stats()` reports the time spent per image in this process.
    """

    def __init__(self, hf_processor, tokens_per_tile: int, tile_size: int, max_tiles: int = 1):
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        if tokens_per_tile < 1:
            raise ValueError(f"tokens_per_tile must be >= 1, got {tokens_per_tile}")
        self.hf_processor = hf_processor
        self.tokens_per_tile = int(tokens_per_tile)
        self.tile_size = int(tile_size)
        self.max_tiles = int(max_tiles)
        self._lock = threading.Lock()
        self._count = 0
        self._seconds = 0.0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]  # a lock does not pickle; each process counts its own images
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def for_model_config(cls, config, max_tiles: int = 1, hf_processor=None) -> "ImageProcessor":
        tile = tile_size_from_config(config)
        if hf_processor is None:
            hf_processor = make_hf_image_processor(tile, max_tiles)
        return cls(hf_processor, tokens_per_tile_from_config(config), tile, max_tiles)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def load(path: str | os.PathLike) -> Image.Image:
        """Open and fully decode an image file as RGB; a missing, corrupt or truncated file names itself."""
        path = Path(path)
        if path.is_dir():
            raise ImageError(f"image path {path} is a folder, not an image file")
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()  # decode now: truncated files fail here, not later in a worker
                return plain_rgb(img)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"cannot decode image {path}: {e}") from e

    # ------------------------------------------------------------------ tiling
    def num_tiles_for_size(self, height: int, width: int) -> int:
        if self.max_tiles == 1:
            return 1
        return int(
            self.hf_processor.get_number_of_image_patches(
                height, width, {"crop_to_patches": True, "max_patches": self.max_tiles, "min_patches": 1}
            )
        )

    def num_image_tokens(self, num_tiles: int) -> int:
        return self.tokens_per_tile * int(num_tiles)

    def __call__(self, image: Image.Image | str | os.PathLike) -> ProcessedImage:
        start = time.perf_counter()
        if not isinstance(image, (Image.Image, str, os.PathLike)):
            raise TypeError(f"ImageProcessor takes a PIL image or an image file path, got {type(image).__name__}")
        source = image if not isinstance(image, Image.Image) else None
        if source is not None:
            image = self.load(source)
        else:
            try:
                image = plain_rgb(image)
            except (OSError, ValueError) as e:  # a mode Pillow cannot convert, e.g. "La"
                raise ImageError(f"in-memory image of mode {image.mode!r} cannot be converted to RGB: {e}") from e
        if min(image.size) < 1:
            raise ImageError(f"{source or 'in-memory image'} is {image.size[0]}x{image.size[1]} pixels: nothing to tile")
        try:
            out = self.hf_processor(
                images=[image],
                crop_to_patches=self.max_tiles > 1,
                max_patches=self.max_tiles,
                min_patches=1,
                return_tensors="np",
            )
        except Exception as e:  # the HF processor raises many types; name the file
            raise ImageError(f"image processing failed for {source or 'in-memory image'}: {e}") from e
        pixel_values = torch.from_numpy(np.ascontiguousarray(out["pixel_values"])).float()
        num_tiles = int(pixel_values.shape[0])
        expected = (num_tiles, 3, self.tile_size, self.tile_size)
        if tuple(pixel_values.shape) != expected:
            raise ImageError(
                f"image processor returned pixel_values of shape {tuple(pixel_values.shape)} for "
                f"{source or 'in-memory image'}; expected {expected}"
            )
        with self._lock:
            self._count += 1
            self._seconds += time.perf_counter() - start
        return ProcessedImage(pixel_values, num_tiles, self.num_image_tokens(num_tiles))

    def stats(self) -> dict:
        with self._lock:
            n, s = self._count, self._seconds
        return {"images": n, "seconds": s, "ms_per_image": 1000.0 * s / n if n else float("nan")}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The image processor config with this processor's tiling (`max_patches` = `max_tiles`), so that
        `load_model` and transformers' InternVLProcessor (which always crops to patches) tile as it does, whatever
        the checkpoint it was loaded from said."""
        import copy

        hf = copy.copy(self.hf_processor)
        hf.crop_to_patches, hf.max_patches, hf.min_patches = self.max_tiles > 1, self.max_tiles, 1
        hf.save_pretrained(str(path))


def _eight_bit_gray(image: Image.Image) -> Image.Image | None:
    """16-bit and 32-bit grayscale (modes I;16*, I, F) on an 8-bit scale, or None for other modes. Pillow's RGB
    conversion clips these values to 255 instead of scaling them, so a 16-bit scan came out white: 16-bit values
    are scaled down, integers no larger than 255 and floats above 1 kept, floats within [0, 1] scaled up."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return None
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and top > 255):
        values = values / 257.0  # 65535 -> 255
    elif image.mode == "F" and top <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def plain_rgb(image: Image.Image) -> Image.Image:
    """The image as RGB pixels and nothing else, as InternVL's own loading gives them, except that 16- and 32-bit
    grayscale is put on the 8-bit scale first (`_eight_bit_gray`; InternVL's conversion saturates it). A palette
    image with a transparent index keeps that index's colour as a colour key once converted, and transformers' RGB
    conversion then whitens every pixel of that colour, opaque ones included."""
    gray = _eight_bit_gray(image)
    if gray is not None:
        return gray.convert("RGB")
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    if "transparency" in rgb.info:
        rgb = rgb.copy() if rgb is image else rgb  # the caller's image keeps its own info
        rgb.info.pop("transparency")
    return rgb


def image_problem(path: str | os.PathLike) -> str | None:
    """None when the file is an image that decodes completely, else what is wrong with it. Reads the header
    (format, size) and decodes every pixel: a truncated or corrupt file fails here, not in a training epoch."""
    path = Path(path)
    if path.is_dir():
        return f"image path {path} is a folder, not an image file"
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width < 1 or height < 1:
                return f"image {path} has no pixels ({width}x{height})"
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"image {path} cannot be decoded: {e}"
    return None


def find_image_problems(paths: Iterable[str | os.PathLike], workers: int | None = None, *,
                        progress: bool = True) -> dict[str, str]:
    """{path: problem} for every path that `image_problem` refuses, each distinct file checked once, on a pool of
    threads (PIL decodes with the GIL released); a progress bar where stderr is a terminal (``progress``)."""
    unique = sorted({str(p) for p in paths})
    if not unique:
        return {}
    workers = workers or min(32, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=min(workers, len(unique))) as pool:
        problems = tqdm(pool.map(image_problem, unique), total=len(unique), desc="checking images", unit="image",
                        leave=False, disable=not progress or not sys.stderr.isatty())  # fmt: skip
        return {path: problem for path, problem in zip(unique, problems) if problem is not None}


def make_hf_image_processor(tile_size: int, max_tiles: int = 1):
    """The transformers PIL-backend InternVL/GotOcr2 processor at a given tile size."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        crop_to_patches=max_tiles > 1,
        max_patches=max_tiles,
        min_patches=1,
    )


def checkpoint_max_tiles(hf_processor) -> int:
    """The most tiles a checkpoint's image processor cuts an image into: its `max_patches`, as transformers'
    InternVLProcessor uses it (that processor always crops to patches, whatever `crop_to_patches` says)."""
    value = getattr(hf_processor, "max_patches", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def load_hf_image_processor(path: str | os.PathLike):
    """Load a checkpoint's image processor config into the PIL backend (works without torchvision)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil.from_pretrained(str(path), local_files_only=True)

"""Images -> ``pixel_values`` as BEiT's Hugging Face image processor (PIL backend) makes them.

Reads the model folder's ``preprocessor_config.json`` and applies, in the processor's order:
resize (PIL, with the config's ``resample`` filter; BeitImageProcessor's default is bicubic),
optional center crop, rescale (``x * rescale_factor`` in float64, then float32) and normalise
(``(x - image_mean) / image_std``), channels first. Absent keys take BeitImageProcessor's
defaults; an absent ``size`` is config.json's ``image_size``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np

PREPROCESSOR = "preprocessor_config.json"
# PIL's filter ids as stored in preprocessor_config.json's "resample".
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def read_preprocessor_config(folder: str | pathlib.Path, what: str) -> dict:
    """Reads ``preprocessor_config.json``; a missing file is a one-line FileNotFoundError."""
    path = pathlib.Path(folder) / PREPROCESSOR
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: copy preprocessor_config.json from the model's Hugging Face "
            f"snapshot into the folder (it holds the {what})."
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return raw


def _size(value, where: str, default: int) -> tuple[int, int]:
    if value is None:
        return default, default
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and {"height", "width"} <= set(value):
        return int(value["height"]), int(value["width"])
    raise ValueError(f"{where}={value!r} is not supported (an int or {{'height', 'width'}}).")


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """BEiT's image preprocessing; ``__call__`` maps uint8 ``[H, W, C]`` images to pixel values."""

    size: tuple[int, int]
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path, config: dict) -> ImagePreprocessor:
        """Reads ``preprocessor_config.json`` of a BEiT folder whose config.json is ``config``.

        Raises:
          FileNotFoundError: if the file is missing.
          ValueError: for a value it cannot honour, or an output size other than the model's.
        """
        raw = read_preprocessor_config(folder, "image size, resample filter, mean and std")
        where = str(pathlib.Path(folder) / PREPROCESSOR)
        image_size = int(config.get("image_size", 224))
        resample = raw.get("resample", 3)
        if resample not in RESAMPLE:
            raise ValueError(f"{where}: resample={resample!r} is not a PIL filter id (0-5).")
        mean = raw.get("image_mean", [0.5, 0.5, 0.5])
        std = raw.get("image_std", [0.5, 0.5, 0.5])
        mean = [mean] * 3 if isinstance(mean, (int, float)) else mean
        std = [std] * 3 if isinstance(std, (int, float)) else std
        out = cls(
            size=_size(raw.get("size"), f"{where}: size", image_size),
            resample=int(resample),
            do_resize=bool(raw.get("do_resize", True)),
            do_center_crop=bool(raw.get("do_center_crop", False)),
            crop_size=_size(raw.get("crop_size"), f"{where}: crop_size", 224),
            do_rescale=bool(raw.get("do_rescale", True)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_normalize=bool(raw.get("do_normalize", True)),
            image_mean=tuple(float(m) for m in mean),
            image_std=tuple(float(s) for s in std),
        )
        channels = int(config.get("num_channels", 3))
        if len(out.image_mean) != channels or len(out.image_std) != channels:
            raise ValueError(f"{where}: image_mean/image_std need {channels} values.")
        if (
            out.do_resize
            and out.do_center_crop
            and (out.crop_size[0] > out.size[0] or out.crop_size[1] > out.size[1])
        ):
            raise ValueError(
                f"{where}: crop_size {out.crop_size[0]}x{out.crop_size[1]} is larger than the "
                f"resized {out.size[0]}x{out.size[1]} images; fix size/crop_size."
            )
        # The crop, else the resize, fixes the output size (neither: the image's own size).
        final = out.crop_size if out.do_center_crop else out.size if out.do_resize else None
        if final is not None and final != (image_size, image_size):
            raise ValueError(
                f"{where}: images come out {final[0]}x{final[1]} but config.json's image_size is "
                f"{image_size}; fix size/crop_size to match the model."
            )
        return out

    def one(self, image: np.ndarray) -> np.ndarray:
        """One uint8 ``[H, W, C]`` (or ``[H, W]``) image -> float32 ``[C, H', W']``."""
        from PIL import Image

        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[-1] == 1 and len(self.image_mean) == 3:
            image = np.repeat(image, 3, axis=-1)  # grayscale -> RGB
        if self.do_resize:
            height, width = self.size
            pil = Image.fromarray(image.astype(np.uint8))
            image = np.asarray(pil.resize((width, height), resample=self.resample))
        if self.do_center_crop:
            ch, cw = self.crop_size
            h, w = image.shape[:2]
            if ch > h or cw > w:
                raise ValueError(f"crop_size {ch}x{cw} is larger than the {h}x{w} image.")
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image[top : top + ch, left : left + cw]
        out = image.astype(np.float64)
        if self.do_rescale:
            out = out * self.rescale_factor
        out = out.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            out = (out - mean) / std
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def __call__(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of images -> ``{'pixel_values': float32 [B, C, H, W]}``."""
        return {"pixel_values": np.stack([self.one(image) for image in images])}

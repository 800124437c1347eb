"""Embedding images for deployment: ``isereid.embed(model_or_checkpoint, images)``.

The preprocessing (input height/width, mean/std) comes from the checkpoint, so the caller only
hands over crops: file paths, PIL images or HWC uint8 arrays.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import DataConfig
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_test_transform
from .errors import DatasetError, InvalidArgument, first_line

DEFAULT_SIZE = (256, 128)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Preprocessing:
    """What a network expects: RGB crops resized (bicubic) to height x width, scaled to [0, 1] and
    normalised with mean/std; it returns feature_dim-dimensional L2-normalised features."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    arch: str = "unknown"
    feature_dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def transform(self):
        return build_test_transform(DataConfig(height=self.height, width=self.width))


def load_embedder(checkpoint: str | os.PathLike, height: Optional[int] = None,
                  width: Optional[int] = None) -> tuple[nn.Module, Preprocessing]:
    """The network of ``checkpoint`` (eval mode, CPU) and its :class:`Preprocessing`: the input size
    stored in the checkpoint (256 x 128 for a file that stores none) unless height/width are given."""
    from .models import load_model_and_meta

    model, meta = load_model_and_meta(checkpoint, map_location="cpu")
    size = meta.input_size or DEFAULT_SIZE
    return model, Preprocessing(height=int(height or size[0]), width=int(width or size[1]),
                                arch=meta.model_config.arch, feature_dim=feature_dim(model))


def feature_dim(model: nn.Module) -> int:
    """The feature dimension of a re-ID network (its ``num_features``, else 0 when it does not say)."""
    return int(getattr(model, "num_features", 0) or 0)


def to_pil(image: ImageInput) -> Image.Image:
    """An RGB PIL image of a path, a PIL image or an (H, W, 3) / (H, W) uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InvalidArgument(f"an image array must be HxW or HxWx3 uint8, not {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read image {image}: {first_line(e)}") from None
    raise InvalidArgument(f"cannot embed a {type(image).__name__}: give paths, PIL images or uint8 arrays")


@torch.no_grad()
def embed_pil(model: nn.Module, images: Sequence[Image.Image], preprocessing: Preprocessing,
              batch_size: int = 64) -> torch.Tensor:
    """Features (N, D) float32 on the CPU of RGB PIL ``images``, computed on the model's device."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    transform = preprocessing.transform()
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[start:start + batch_size]]).to(device)
        chunks.append(model(batch).float().cpu())
    model.train(was_training)
    if not chunks:
        return torch.zeros((0, feature_dim(model)))
    return torch.cat(chunks)


def embed(model_or_checkpoint: Union[nn.Module, str, os.PathLike], images: Sequence[ImageInput] | ImageInput,
          batch_size: int = 64, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
    """L2-normalised features (N, D) float32 (CPU) of ``images``: file paths, PIL images or HWC uint8
    arrays (RGB), a list or a single one.

    model_or_checkpoint: an isereid checkpoint / released ``.pth.tar`` (its stored input size is
    used) or a loaded network (then give height/width unless it was trained at 256 x 128). The
    network runs on the device its parameters are on.
    """
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        if not Path(model_or_checkpoint).is_file():
            raise DatasetError(f"checkpoint not found: {model_or_checkpoint}")
        model, prep = load_embedder(model_or_checkpoint, height, width)
    else:
        model = model_or_checkpoint
        size = getattr(model, "input_size", None) or DEFAULT_SIZE
        prep = Preprocessing(height=int(height or size[0]), width=int(width or size[1]),
                             feature_dim=feature_dim(model))
    single = isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray)
                                                                    and images.ndim in (2, 3)
                                                                    and images.dtype == np.uint8)
    batch = [images] if single else list(images)
    return embed_pil(model, [to_pil(im) for im in batch], prep, batch_size=batch_size)

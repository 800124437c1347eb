"""Datasets, image loading, transforms, identity-balanced sampling and synthetic demo data."""
from __future__ import annotations

from .datasets import (
    DATASET_NAMES,
    ReidDataset,
    Sample,
    build_dataset,
    images_in_folder,
    parse_image_name,
)
from .demo import generate_demo_data
from .images import ImageDataset, check_images, drop_unreadable
from .sampler import BatchListSampler, epoch_batches, sample_pass
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ReferenceRandomErasing,
    build_test_transform,
    build_train_transform,
)

__all__ = [
    "DATASET_NAMES", "ReidDataset", "Sample", "build_dataset", "images_in_folder", "parse_image_name",
    "ImageDataset", "check_images", "drop_unreadable", "BatchListSampler", "epoch_batches", "sample_pass",
    "IMAGENET_MEAN", "IMAGENET_STD", "ReferenceRandomErasing", "build_test_transform", "build_train_transform",
    "generate_demo_data",
]


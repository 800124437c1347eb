"""The re-ID network (ResNet trunk, avg/GeM pooling, BN neck, L2 norm), ghost batch norm and
checkpoint loading."""
from __future__ import annotations

from .backbones import build_backbone
from .batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, convert_batchnorm
from .loading import CheckpointMeta, infer_model_config, load_model, load_model_and_meta
from .pooling import GeneralizedMeanPooling, build_pooling
from .reid import ReidNet, build_model, trainable_parameters
from .state_io import extract_state_dict, safe_load

__all__ = [
    "ReidNet",
    "build_model",
    "trainable_parameters",
    "load_model",
    "load_model_and_meta",
    "CheckpointMeta",
    "safe_load",
    "convert_batchnorm",
    "build_backbone",
    "build_pooling",
    "GeneralizedMeanPooling",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "extract_state_dict",
    "infer_model_config",
]

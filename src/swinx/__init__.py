"""swinx: the Swin Transformer (V1 and V2) for PyTorch."""

from swinx.model.backbone import SwinBackbone, create_backbone
from swinx.model.config import SwinConfig
from swinx.model.swin import SwinTransformer
from swinx.model.variants import create_model, get_config, list_models
from swinx.weights.checkpoint import (
    CheckpointError,
    LoadReport,
    export_state_dict,
    load_checkpoint,
    load_model,
    save_model,
)
from swinx.weights.layouts import LAYOUTS

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "LoadReport",
    "SwinBackbone",
    "SwinConfig",
    "SwinTransformer",
    "create_backbone",
    "create_model",
    "export_state_dict",
    "get_config",
    "list_models",
    "load_checkpoint",
    "load_model",
    "save_model",
]
__version__ = "0.1.0"

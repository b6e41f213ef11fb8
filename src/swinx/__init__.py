"""swinx: the Swin Transformer (V1 and V2) for PyTorch."""

from .checkpoint import (CheckpointError, LoadReport, export_state_dict, load_checkpoint, load_model,
                         save_model)
from .config import SwinConfig
from .layouts import LAYOUTS
from .model import SwinTransformer
from .variants import create_model, get_config, list_models

__all__ = ["LAYOUTS", "CheckpointError", "LoadReport", "SwinConfig", "SwinTransformer", "create_model",
           "export_state_dict", "get_config", "list_models", "load_checkpoint", "load_model", "save_model"]
__version__ = "0.1.0"

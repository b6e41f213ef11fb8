"""swinx: the Swin Transformer (V1 and V2) for PyTorch."""

from .config import SwinConfig
from .model import SwinTransformer
from .variants import create_model, get_config, list_models

__all__ = ["SwinConfig", "SwinTransformer", "create_model", "get_config", "list_models"]
__version__ = "0.1.0"

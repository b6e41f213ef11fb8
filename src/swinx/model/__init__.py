"""The model: configuration, named variants, window geometry, attention and the Swin Transformer."""

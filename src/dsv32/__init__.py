"""dsv32: DeepSeek-V3.2 from scratch in PyTorch."""
from dsv32.config import ModelConfig
from dsv32.model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "Transformer", "ModelOutput", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"


def __getattr__(name):
    # the checkpoint module imports safetensors; keep `import dsv32` light
    if name in ("load_pretrained", "save_pretrained"):
        from dsv32 import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)

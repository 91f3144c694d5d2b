"""Drop-in torch.nn modules on fastseq kernels (re-exports)."""
from .layer_norm import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm"]

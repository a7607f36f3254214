"""fsam_ds: Fisher SAM (FSAM) for DeepSpeed ZeRO stages 0-3, with an exact sharded top-k mask."""
from fsam_ds.config import FSAMConfig
from fsam_ds.optimizer import FSAM
from fsam_ds.topk_threshold import exact_topk_threshold

__all__ = ["FSAM", "FSAMConfig", "exact_topk_threshold"]
__version__ = "0.1.0"

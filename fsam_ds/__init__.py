"""fsam_ds: Fisher SAM (FSAM) for DeepSpeed ZeRO stages 0-3, with an exact sharded top-k mask.

    fsam_ds.FSAM                 torch.optim.Optimizer wrapper (one process, DDP)
    fsam_ds.initialize           deepspeed.initialize with FSAM built from the config
    fsam_ds.train_step           one FSAM step (two passes) of a DeepSpeed engine
    fsam_ds.exact_topk_threshold the sharded exact top-k threshold (radix select)
    fsam_ds.checkpoint           crash-safe save/load (latest moves only after all ranks wrote)
Importing fsam_ds registers "FSAM" as a DeepSpeed optimizer type (as torch.optim.FSAM).
"""
import torch

from fsam_ds import checkpoint
from fsam_ds.config import FSAMConfig
from fsam_ds.engine import initialize, train_step
from fsam_ds.optimizer import FSAM
from fsam_ds.topk_threshold import exact_topk_threshold

__all__ = ["FSAM", "FSAMConfig", "initialize", "train_step", "exact_topk_threshold", "checkpoint"]
__version__ = "0.1.0"


class _FSAMFromDeepSpeedConfig(FSAM):
    """What DeepSpeed builds for {"optimizer": {"type": "FSAM", "params": {...}}}: DeepSpeed looks
    the type up on torch.optim and passes the params as keywords, so the base optimizer arrives as
    a name ("AdamW"). fsam_ds.train_step then drives the two passes."""

    def __init__(self, params, base_optimizer="AdamW", **kwargs):
        from fsam_ds.engine import resolve_optimizer_class
        import warnings
        if isinstance(base_optimizer, str):
            base_optimizer = resolve_optimizer_class(base_optimizer)
        with warnings.catch_warnings():  # names come from the engine's module at attach time
            warnings.filterwarnings("ignore", message="FSAM got parameters without names")
            super().__init__(params, base_optimizer, **kwargs)
        self.allow_base_steps = True  # until train_step attaches (DeepSpeed's set-up steps)


_FSAMFromDeepSpeedConfig.__name__ = _FSAMFromDeepSpeedConfig.__qualname__ = "FSAM"
torch.optim.FSAM = _FSAMFromDeepSpeedConfig

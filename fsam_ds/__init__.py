"""fsam_ds: Fisher SAM (FSAM) for DeepSpeed ZeRO stages 0-3, with an exact sharded top-k mask.

    fsam_ds.FSAM                 torch.optim.Optimizer wrapper (one process, DDP)
    fsam_ds.initialize           deepspeed.initialize with FSAM built from the config
    fsam_ds.train_step           one FSAM step (two passes) of a DeepSpeed engine
    fsam_ds.exact_topk_threshold the sharded exact top-k threshold (radix select)
    fsam_ds.checkpoint           crash-safe save/load (latest moves only after all ranks wrote)
Importing fsam_ds registers "FSAM" as a DeepSpeed optimizer type (as torch.optim.FSAM) and hooks
DeepSpeed's engine construction so that an FSAM engine stepped any other way than by train_step
raises instead of silently training its base optimizer.
"""
from fsam_ds import checkpoint
from fsam_ds.config import FSAMConfig
from fsam_ds.deepspeed_client import FSAMDeepSpeedClient, register_with_deepspeed
from fsam_ds.engine import initialize, train_step
from fsam_ds.optimizer import FSAM
from fsam_ds.topk_threshold import exact_topk_threshold

__all__ = ["FSAM", "FSAMConfig", "FSAMDeepSpeedClient", "initialize", "train_step",
           "exact_topk_threshold", "checkpoint"]
__version__ = "0.2.0"

register_with_deepspeed()

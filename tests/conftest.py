import os
import sys

# Tests import their helpers (dist_harness) as top-level modules; DeepSpeed runs on the CPU.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

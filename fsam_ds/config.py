"""The FSAM settings: one typed object, range-checked at construction.

In a DeepSpeed JSON they live in the "fsam" block; `FSAM(...)` takes the same names as keywords.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

FISHER_MODES = ("grad_sq", "exp_avg_sq")
# The paper's code always perturbs biases and embeddings; norms are tiny and scale-like, so they
# are always perturbed too. Patterns are case-insensitive regular expressions searched in the name:
# BERT/RoBERTa (embeddings.*, LayerNorm), Llama/Mistral/Qwen/OPT/NeoX (embed_tokens, embed_in,
# *layernorm, norm; a tied lm_head is named embed_tokens), GPT-2/GPT-J/Falcon (wte, wpe, ln_1, ln_f,
# ln_attn) and T5 (shared, layer_norm, relative_attention_bias).
DEFAULT_ALWAYS_PERTURB = ("bias", "norm", "embed", r"(^|\.)(wte|wpe)\.", r"(^|\.)ln_", r"(^|\.)shared\.")


@dataclass(frozen=True)
class FSAMConfig:
    rho: float = 0.05
    """Perturbation radius: ||e|| = rho for a full mask. 0 gives the base optimizer alone."""
    sparsity: float = 0.9
    """Fraction of ranked elements NOT perturbed, in [0, 1). 0 is plain SAM; 0.9 keeps the top 10%."""
    mask_interval: int = 100
    """Recompute the Fisher mask every this many optimizer steps (>= 1); reuse it in between."""
    fisher: str = "grad_sq"
    """Score: "grad_sq" (g*g of the step's batch) or "exp_avg_sq" (Adam's second moment)."""
    adaptive: bool = False
    """ASAM-style perturbation e = rho * m*w*w*g / ||w*g||."""
    always_perturb: tuple = field(default=DEFAULT_ALWAYS_PERTURB)
    """Parameter-name patterns that are always perturbed and never ranked."""
    sam_interval: int = 1
    """Take the perturbed two-pass step every this many optimizer steps (>= 1) and one plain base
    step otherwise (as Composer's SAM `interval`); the mask is refreshed on perturbed steps only."""

    def __post_init__(self):
        _check_number("rho", self.rho)
        if not 0 <= self.rho < float("inf"):
            raise ValueError(f"Invalid rho: {self.rho} (must be finite and >= 0; 0.05 is the "
                             "paper's value)")
        _check_number("sparsity", self.sparsity)
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"Invalid sparsity: {self.sparsity} (must be in [0, 1): 0 is SAM, "
                             "0.9 keeps the top 10%)")
        if isinstance(self.mask_interval, bool) or not isinstance(self.mask_interval, int) \
                or self.mask_interval < 1:
            raise ValueError(f"Invalid mask_interval: {self.mask_interval!r} (must be an integer "
                             ">= 1; 1 refreshes the mask every step)")
        if isinstance(self.sam_interval, bool) or not isinstance(self.sam_interval, int) \
                or self.sam_interval < 1:
            raise ValueError(f"Invalid sam_interval: {self.sam_interval!r} (must be an integer "
                             ">= 1; 1 perturbs every step, 2 every other step)")
        if self.fisher not in FISHER_MODES:
            raise ValueError(f"Invalid fisher: {self.fisher!r} (must be one of {FISHER_MODES})")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"Invalid adaptive: {self.adaptive!r} (must be true or false)")
        patterns = self.always_perturb
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"Invalid always_perturb: {patterns!r} (must be a list of name "
                             'patterns, e.g. ["bias", "norm", "embed"], or [] for none)')
        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"Invalid always_perturb pattern {p!r}: {err}") from None
        object.__setattr__(self, "always_perturb", tuple(patterns))

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, block: dict) -> "FSAMConfig":
        """Build from a JSON "fsam" block; unknown keys are errors (a typo must not be ignored)."""
        if not isinstance(block, dict):
            raise ValueError(f'The "fsam" config block must be a JSON object, got {block!r}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(f'Unknown key(s) {unknown} in the "fsam" config block; '
                             f"valid keys: {sorted(known)}")
        return cls(**block)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["always_perturb"] = list(self.always_perturb)
        return d

    def is_always_perturbed(self, name: str | None) -> bool:
        return name is not None and any(re.search(p, name, re.IGNORECASE)
                                        for p in self.always_perturb)


def _check_number(key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {key}: {value!r} (must be a number)")

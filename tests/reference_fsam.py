"""An independent single-process FSAM, written straight from FSAM_SPEC.md: exact torch.topk over
all ranked elements, full fp32 weight copies for restore. Tests compare fsam_ds against it."""
import math
import re
from fractions import Fraction

import torch


class ReferenceFSAM:
    def __init__(self, named_params, base_optimizer, rho, sparsity, mask_interval=1,
                 fisher="grad_sq", adaptive=False, always_perturb=("bias", "norm", "embed"),
                 param_groups=None, **kw):
        self.names, self.params = zip(*[(n, p) for n, p in named_params])
        self.base = base_optimizer(param_groups or self.params, **kw)
        self.rho, self.sparsity, self.interval = rho, sparsity, mask_interval
        self.fisher, self.adaptive, self.t, self.masks = fisher, adaptive, 0, None
        self.last_window = -1   # t // mask_interval at the last refresh (spec: "Interval mode")
        self.always = [any(re.search(p, n, re.I) for p in always_perturb) for n in self.names]

    def _scores(self, p):
        state = self.base.state.get(p, {})
        if self.fisher == "exp_avg_sq" and "exp_avg_sq" in state:
            return state["exp_avg_sq"].flatten()
        return (p.grad * p.grad).flatten()

    @torch.no_grad()
    def first_step(self):
        if self.t // self.interval > self.last_window:
            self.last_window = self.t // self.interval
            ranked = [i for i, a in enumerate(self.always) if not a]
            scores = torch.cat([self._scores(self.params[i]) for i in ranked]) if ranked else torch.zeros(0)
            k = math.ceil((1 - Fraction(repr(self.sparsity))) * scores.numel())
            flat = torch.zeros(scores.numel(), dtype=torch.bool)
            flat[torch.topk(scores, k).indices] = True
            self.masks, offset = [], 0
            for p, a in zip(self.params, self.always):
                if a:
                    self.masks.append(torch.ones_like(p, dtype=torch.bool))
                else:
                    self.masks.append(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
        grads = [p.grad for p in self.params]
        xs = [p * g if self.adaptive else g for p, g in zip(self.params, grads)]
        norm = torch.norm(torch.stack([x.norm(2) for x in xs]), 2)
        scale = self.rho / (norm + 1e-12)
        self.saved = [p.detach().clone() for p in self.params]
        for p, g, m in zip(self.params, grads, self.masks):
            e = (p * p if self.adaptive else 1.0) * g * scale
            p.add_(e * m)

    @torch.no_grad()
    def second_step(self, clip=0.0):
        for p, w in zip(self.params, self.saved):
            p.copy_(w)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.base.step()
        self.t += 1

    @torch.no_grad()
    def plain_step(self, clip=0.0):
        """A step of interval mode without perturbation: the base optimizer with g."""
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.base.step()
        self.t += 1

    def zero_grad(self):
        self.base.zero_grad()

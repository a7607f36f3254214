"""`FSAM` for pure PyTorch (one process, or DDP with replicated parameters): a torch.optim.Optimizer
around any base optimizer, with the paper's two phases as its API (as davda54/sam):

    loss_fn().backward(); opt.first_step(zero_grad=True)    # climb to w + e on the masked elements
    loss_fn().backward(); opt.second_step(zero_grad=True)   # restore w exactly, base step with g'
    # or: opt.step(closure)   (closure: forward + backward, returns the loss)

The step's math lives in `fsam_core.FSAMCore`; under DeepSpeed the engine owns the parameters and
`fsam_ds.deepspeed_client.FSAMDeepSpeedClient` drives the same core instead.
"""
from __future__ import annotations

import warnings

import torch

from fsam_ds.config import DEFAULT_ALWAYS_PERTURB, FSAMConfig
from fsam_ds.fsam_core import FSAMCore, Slot
from fsam_ds.shard_layout import ShardLayout


def check_base_optimizer(base_optimizer) -> None:
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise ValueError(f"Invalid base_optimizer: {base_optimizer!r} (must be a "
                         "torch.optim.Optimizer class such as torch.optim.AdamW, not an instance)")
    if getattr(base_optimizer, "_is_fsam", False):
        raise ValueError("Invalid base_optimizer: FSAM cannot wrap itself")


class BaseOptimizerFacade(torch.optim.Optimizer):
    """An Optimizer whose param_groups and state are its base optimizer's, so that LR schedulers
    and DeepSpeed (which reassigns `param_groups`, one ZeRO group at a time) see the base
    optimizer's groups. Plain aliasing breaks under ZeRO-Offload; properties with setters do not."""
    _is_fsam = True

    def _build_base(self, params, base_optimizer, base_kwargs):
        super().__init__(params, {})
        try:
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        except TypeError as err:
            raise ValueError(f"Invalid keyword arguments {sorted(base_kwargs)} for "
                             f"{base_optimizer.__name__}: {err}") from None
        self.defaults.update(self.base_optimizer.defaults)

    @property
    def param_groups(self):
        base = self.__dict__.get("base_optimizer")
        return base.param_groups if base is not None else self.__dict__["_own_param_groups"]

    @param_groups.setter
    def param_groups(self, value):
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.param_groups = value
        else:
            self.__dict__["_own_param_groups"] = value

    @property
    def state(self):
        base = self.__dict__.get("base_optimizer")
        return base.state if base is not None else self.__dict__["_own_state"]

    @state.setter
    def state(self, value):
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.state = value
        else:
            self.__dict__["_own_state"] = value

    # FSAM's own progress rides along in the base optimizer's state_dict, under "fsam"
    def state_dict(self):
        state = self.base_optimizer.state_dict()
        state["fsam"] = self.core.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        fsam_state = state_dict.pop("fsam", None)
        self.base_optimizer.load_state_dict(state_dict)
        if fsam_state is None:
            self.core.forget_masks("the loaded optimizer state has no FSAM entry")
        else:
            self.core.load_state_dict(fsam_state)

    @property
    def last_stats(self) -> dict:
        """threshold, mask_density, grad_norm, perturbation_norm... of the latest step."""
        return self.core.last_stats

    @property
    def num_steps(self) -> int:
        return self.core.num_steps

    def state_bytes(self) -> int:
        return self.core.state_bytes()

    def invalidate_masks(self, reason: str) -> None:
        """Recompute the mask at the next step (with a warning naming `reason`). Safe to call on
        some ranks only: the step plan makes every rank refresh."""
        self.core.forget_masks(reason)


class FSAM(BaseOptimizerFacade):
    """Fisher SAM (Zhong et al., 2022) around `base_optimizer`.

    params: parameters or `model.named_parameters()` (names are needed for `always_perturb`).
    base_optimizer: a torch.optim.Optimizer class; `**base_kwargs` go to it (lr, weight_decay...).
    rho, sparsity, mask_interval, fisher, adaptive, always_perturb, sam_interval: see
    `fsam_ds.config.FSAMConfig`. With rho == 0, or on the plain steps of sam_interval > 1,
    first_step() perturbs nothing and step(closure) runs the closure once; `perturbs_this_step()`
    tells two-phase loops that they may skip the second pass.
    """

    def __init__(self, params, base_optimizer=torch.optim.AdamW, rho=0.05, sparsity=0.9,
                 mask_interval=100, fisher="grad_sq", adaptive=False,
                 always_perturb=DEFAULT_ALWAYS_PERTURB, sam_interval=1, **base_kwargs):
        check_base_optimizer(base_optimizer)
        self.config = FSAMConfig(rho=rho, sparsity=sparsity, mask_interval=mask_interval,
                                 fisher=fisher, adaptive=adaptive, always_perturb=always_perturb,
                                 sam_interval=sam_interval)
        self._build_base(params, base_optimizer, base_kwargs)
        self.core = FSAMCore(self.config, process_group=None)   # parameters are replicated
        self._perturbed = False
        if self.config.always_perturb and not any(g.get("param_names") for g in self.param_groups):
            warnings.warn("FSAM got parameters without names, so always_perturb patterns "
                          f"{list(self.config.always_perturb)} match nothing and every element is "
                          "ranked; pass model.named_parameters() to use them.", stacklevel=2)

    def perturbs_this_step(self) -> bool:
        return self.core.perturbs_this_step()

    def _slots(self) -> list:
        """This step's slots: every parameter with a gradient, keyed (group index, index). The set
        can change between steps (a parameter unused at t = 0): the plan recounts |R| each step."""
        slots = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [None] * len(group["params"])
            for pi, (p, name) in enumerate(zip(group["params"], names)):
                if p.grad is None:
                    continue
                if not p.is_contiguous():
                    raise ValueError(f"FSAM needs contiguous parameters; {name or f'group {gi} '}"
                                     f"parameter {pi} is not (call .contiguous() on it)")
                slots.append(Slot((gi, pi), p, p.grad,
                                  ShardLayout.whole(p.numel(), self.config.is_always_perturbed(name))))
        return slots

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False):
        """Perturb the masked parameters to w + e using the gradients now in `.grad`."""
        if self._perturbed:
            raise RuntimeError("FSAM.first_step() called twice: call second_step() to finish the "
                               "previous step first")
        if self.core.perturbs_this_step():
            self.core.perturb(self._slots(), adam_state=lambda w: self.state.get(w, {}))
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False):
        """Restore w exactly and take the base optimizer's step with the gradients at w + e."""
        if not self._perturbed:
            raise RuntimeError("FSAM.second_step() called before first_step(): call first_step() "
                               "after the first backward")
        self.core.restore_all()
        self.base_optimizer.step()
        self._opt_called = True   # torch LR schedulers look for this; second_step bypasses step()
        self._perturbed = False
        self.core.finish_step(base_stepped=True)
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """closure zeroes nothing itself, runs forward + backward and returns the loss; it is
        called at w and (on perturbed steps) at w + e. Returns the first loss."""
        if closure is None:
            raise RuntimeError("FSAM.step() needs a closure that runs forward + backward and "
                               "returns the loss; or call first_step() and second_step()")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        perturbs = self.core.perturbs_this_step()
        self.first_step(zero_grad=perturbs)
        if perturbs:
            closure()
        self.second_step(zero_grad=True)
        return loss

    def load_state_dict(self, state_dict):
        if self._perturbed:
            raise RuntimeError("FSAM.load_state_dict() called between first_step() and second_step()")
        super().load_state_dict(state_dict)

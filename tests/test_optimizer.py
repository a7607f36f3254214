"""fsam_ds.FSAM in one process (and under DDP) against the independent reference and known optimizers."""
import copy

import pytest
import torch

import fsam_ds
from dist_harness import run_ranks
from reference_fsam import ReferenceFSAM


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.fc1 = torch.nn.Linear(8, 13)
        self.norm = torch.nn.LayerNorm(13)
        self.fc2 = torch.nn.Linear(13, 3)

    def forward(self, tokens):
        return self.fc2(torch.tanh(self.norm(self.fc1(self.embed(tokens).mean(1)))))


def batches(n_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 20, (16, 5), generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n_steps)]


def loss_of(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def train_fsam(model, opt, data):
    for batch in data:
        loss_of(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


ADAMW = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)


@pytest.mark.parametrize("settings", [
    dict(sparsity=0.9, mask_interval=1),
    dict(sparsity=0.5, mask_interval=3),
    dict(sparsity=0.9, mask_interval=2, fisher="exp_avg_sq"),
    dict(sparsity=0.7, mask_interval=1, adaptive=True, rho=0.5),
    dict(sparsity=0.8, mask_interval=1, always_perturb=[]),
])
@pytest.mark.parametrize("chunk_numel", [None, 7])
def test_matches_reference_for_20_adamw_steps(settings, chunk_numel, monkeypatch):
    """chunk_numel=7: the Fisher scores reach the threshold and the mask in 7-element chunks
    (cut across parameters' range boundaries), with the threshold's sampling narrowing forced on
    (every 2nd score sampled, whatever the sample size); neither may change anything."""
    if chunk_numel:
        monkeypatch.setattr(fsam_ds.fsam_core, "CHUNK_NUMEL", chunk_numel)
        monkeypatch.setattr(fsam_ds.topk_threshold, "SAMPLE_STRIDE", 2)
        monkeypatch.setattr(fsam_ds.topk_threshold, "MIN_SAMPLE", 1)
    settings = {"rho": 0.05, **settings}
    torch.manual_seed(0)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    opt = fsam_ds.FSAM(model.named_parameters(), torch.optim.AdamW, **settings, **ADAMW)
    ref = ReferenceFSAM(ref_model.named_parameters(), torch.optim.AdamW, **settings, **ADAMW)
    for batch in batches(20):
        loss_of(model, batch).backward(); opt.first_step(zero_grad=True)
        loss_of(model, batch).backward(); opt.second_step(zero_grad=True)
        loss_of(ref_model, batch).backward(); ref.first_step(); ref.zero_grad()
        loss_of(ref_model, batch).backward(); ref.second_step(); ref.zero_grad()
    assert max_diff(model, ref_model) < 1e-6
    assert opt.num_steps == 20
    # the runs moved the weights: the comparison is not trivially between two untouched models
    torch.manual_seed(0)
    assert max_diff(TinyNet(), model) > 1e-3


def davda54_sam_step(model, base, batch, rho):
    """davda54/sam semantics: e = rho * g / ||g||, climb, second gradient, restore, base step."""
    params = [p for p in model.parameters()]
    loss_of(model, batch).backward()
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2)
        scale = rho / (norm + 1e-12)
        saved = [p.clone() for p in params]
        for p in params:
            p.add_(p.grad * scale)
    base.zero_grad()
    loss_of(model, batch).backward()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    base.step()
    base.zero_grad()


def test_sparsity_zero_is_sam():
    torch.manual_seed(1)
    model, sam_model = TinyNet(), None
    sam_model = copy.deepcopy(model)
    opt = fsam_ds.FSAM(model.named_parameters(), torch.optim.AdamW, rho=0.1, sparsity=0.0, **ADAMW)
    base = torch.optim.AdamW(sam_model.parameters(), **ADAMW)
    data = batches(10, seed=1)
    train_fsam(model, opt, data)
    for batch in data:
        davda54_sam_step(sam_model, base, batch, rho=0.1)
    assert max_diff(model, sam_model) < 1e-6
    assert opt.last_stats["mask_density"] == 1.0
    assert opt.last_stats["perturbation_norm"] == pytest.approx(0.1, rel=1e-5)  # ||e|| = rho


def test_rho_zero_is_the_base_optimizer_bit_for_bit():
    torch.manual_seed(2)
    model = TinyNet()
    plain = copy.deepcopy(model)
    opt = fsam_ds.FSAM(model.named_parameters(), torch.optim.AdamW, rho=0.0, **ADAMW)
    base = torch.optim.AdamW(plain.parameters(), **ADAMW)
    data = batches(10, seed=2)
    train_fsam(model, opt, data)
    for batch in data:
        loss_of(plain, batch).backward(); base.step(); base.zero_grad()
    assert max_diff(model, plain) == 0.0


def test_restore_is_bit_identical_before_the_base_update():
    torch.manual_seed(3)
    model = TinyNet()
    opt = fsam_ds.FSAM(model.named_parameters(), torch.optim.SGD, rho=0.5, sparsity=0.5, lr=0.1)
    batch = batches(1, seed=3)[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, batch).backward()
    opt.first_step(zero_grad=True)
    moved = sum(int((p != w).sum()) for p, w in zip(model.parameters(), before))
    assert moved > 0
    loss_of(model, batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    for p, w, g in zip(model.parameters(), before, grads):
        assert torch.equal(p.detach(), torch.add(w, g, alpha=-0.1))  # SGD from the restored w


def test_lr_scheduler_and_param_groups_are_the_base_optimizers():
    model = TinyNet()
    opt = fsam_ds.FSAM([{"params": model.fc1.parameters(), "weight_decay": 0.0},
                        {"params": model.fc2.parameters()}], torch.optim.AdamW, lr=1.0,
                       always_perturb=[])
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 0.01
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    batch = (torch.randint(0, 20, (4, 5)), torch.randint(0, 3, (4,)))
    for _ in range(3):
        train_fsam(model, opt, [batch])
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.125


def test_step_with_closure_equals_two_phase_calls():
    torch.manual_seed(4)
    a = TinyNet()
    b = copy.deepcopy(a)
    opt_a = fsam_ds.FSAM(a.named_parameters(), torch.optim.AdamW, sparsity=0.6, **ADAMW)
    opt_b = fsam_ds.FSAM(b.named_parameters(), torch.optim.AdamW, sparsity=0.6, **ADAMW)
    data = batches(5, seed=4)
    train_fsam(a, opt_a, data)
    for batch in data:
        loss = opt_b.step(lambda: (l := loss_of(b, batch)).backward() or l)
        assert loss is not None and loss.ndim == 0
    assert max_diff(a, b) == 0.0


def test_state_dict_round_trip_mid_run_continues_identically():
    torch.manual_seed(5)
    a = TinyNet()
    opt_a = fsam_ds.FSAM(a.named_parameters(), torch.optim.AdamW, sparsity=0.8, mask_interval=4, **ADAMW)
    data = batches(10, seed=5)
    train_fsam(a, opt_a, data[:6])           # t = 6: between refreshes (4 and 8)
    b = copy.deepcopy(a)
    opt_b = fsam_ds.FSAM(b.named_parameters(), torch.optim.AdamW, sparsity=0.8, mask_interval=4, **ADAMW)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.num_steps == 6
    train_fsam(a, opt_a, data[6:])
    train_fsam(b, opt_b, data[6:])
    assert max_diff(a, b) == 0.0


def test_phases_out_of_order_raise():
    model = TinyNet()
    opt = fsam_ds.FSAM(model.named_parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    loss_of(model, batches(1)[0]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="closure"):
        fsam_ds.FSAM(model.parameters(), torch.optim.SGD, lr=0.1, always_perturb=[]).step()


@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=-0.1), "rho: -0.1"),
    (dict(sparsity=1.0), "sparsity: 1.0"),
    (dict(sparsity=-0.5), "sparsity: -0.5"),
    (dict(mask_interval=0), "mask_interval: 0"),
    (dict(mask_interval=2.5), "mask_interval: 2.5"),
    (dict(fisher="hessian"), "fisher: 'hessian'"),
    (dict(base_optimizer="AdamW"), "base_optimizer: 'AdamW'"),
    (dict(base_optimizer=torch.optim.AdamW([torch.zeros(1, requires_grad=True)])), "base_optimizer"),
    (dict(always_perturb="bias"), "always_perturb"),
    (dict(always_perturb=["(bias"]), "always_perturb pattern"),
])
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, match):
    model = TinyNet()
    kwargs = {"base_optimizer": torch.optim.AdamW, **kwargs}
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        fsam_ds.FSAM(model.named_parameters(), lr=1e-3, **kwargs)


def test_unnamed_parameters_warn_that_patterns_match_nothing():
    with pytest.warns(UserWarning, match="named_parameters"):
        fsam_ds.FSAM(TinyNet().parameters(), torch.optim.SGD, lr=0.1)


def test_nonfinite_gradient_stops_before_touching_weights():
    model = TinyNet()
    opt = fsam_ds.FSAM(model.named_parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, batches(1)[0]).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="gradient norm is nan"):
        opt.first_step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


def ddp_rank(rank, world_size):
    """Each rank trains a DDP replica on its half of every global batch."""
    torch.manual_seed(0)
    model = TinyNet()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = fsam_ds.FSAM(ddp.named_parameters(), torch.optim.AdamW, sparsity=0.9, mask_interval=2, **ADAMW)
    for tokens, labels in batches(6, seed=7):
        part = (tokens.chunk(world_size)[rank], labels.chunk(world_size)[rank])
        loss_of(ddp, part).backward(); opt.first_step(zero_grad=True)
        loss_of(ddp, part).backward(); opt.second_step(zero_grad=True)
    return [p.detach() for p in model.parameters()]


def test_ddp_two_ranks_equal_one_process():
    results = run_ranks(ddp_rank, 2)
    torch.manual_seed(0)
    model = TinyNet()
    ref = ReferenceFSAM(model.named_parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9,
                        mask_interval=2, **ADAMW)
    for batch in batches(6, seed=7):
        loss_of(model, batch).backward(); ref.first_step(); ref.zero_grad()
        loss_of(model, batch).backward(); ref.second_step(); ref.zero_grad()
    for rank_params in results:
        diff = max((p - q).abs().max().item() for p, q in zip(rank_params, model.parameters()))
        assert diff < 1e-6


def test_sam_resumes_from_a_torch_save_round_trip():
    """sparsity 0 (SAM) through torch.save/torch.load, not deepcopy (which keeps object identity):
    the mask comes back as data, fits, and the run continues bit-identically."""
    import io
    torch.manual_seed(6)
    a = TinyNet()
    opt_a = fsam_ds.FSAM(a.named_parameters(), torch.optim.AdamW, sparsity=0.0, mask_interval=4, **ADAMW)
    data = batches(8, seed=6)
    train_fsam(a, opt_a, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    b = TinyNet()
    b.load_state_dict(saved["model"])
    opt_b = fsam_ds.FSAM(b.named_parameters(), torch.optim.AdamW, sparsity=0.0, mask_interval=4, **ADAMW)
    opt_b.load_state_dict(saved["opt"])
    train_fsam(b, opt_b, data[5:6])
    assert opt_b.last_stats["refreshed"] is False   # t = 5: the loaded mask was reused
    train_fsam(b, opt_b, data[6:])
    train_fsam(a, opt_a, data[5:])
    assert max_diff(a, b) == 0.0


class LateHead(TinyNet):
    """fc_late gets a gradient only from step 1 on: the set of parameters with gradients changes."""

    def __init__(self):
        super().__init__()
        self.fc_late = torch.nn.Linear(13, 3)
        self.use_late = False

    def forward(self, tokens):
        h = torch.tanh(self.norm(self.fc1(self.embed(tokens).mean(1))))
        return self.fc2(h) + (self.fc_late(h) if self.use_late else 0)


def test_parameter_unused_at_the_first_step_joins_the_ranking():
    torch.manual_seed(8)
    model = LateHead()
    opt = fsam_ds.FSAM(model.named_parameters(), torch.optim.AdamW, sparsity=0.9, mask_interval=100,
                       **ADAMW)
    data = batches(2, seed=8)
    train_fsam(model, opt, data[:1])
    early = dict(opt.last_stats)
    model.use_late = True
    train_fsam(model, opt, data[1:])
    late = opt.last_stats
    ranked_weights = [model.fc1.weight, model.fc2.weight]
    assert early["num_ranked"] == sum(p.numel() for p in ranked_weights)
    # the new weight has no mask: every rank refreshes, and |R| and k count it
    assert late["refreshed"] and late["num_ranked"] == early["num_ranked"] + model.fc_late.weight.numel()
    assert late["num_kept"] == -(-late["num_ranked"] // 10)


@pytest.mark.parametrize("sam_interval, mask_interval", [(2, 1), (3, 4)])
def test_interval_mode_matches_reference(sam_interval, mask_interval):
    torch.manual_seed(9)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    opt = fsam_ds.FSAM(model.named_parameters(), torch.optim.AdamW, sparsity=0.8,
                       mask_interval=mask_interval, sam_interval=sam_interval, **ADAMW)
    ref = ReferenceFSAM(ref_model.named_parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.8,
                        mask_interval=mask_interval, **ADAMW)
    calls = []
    for t, batch in enumerate(batches(12, seed=9)):
        opt.step(lambda: calls.append(t) or (l := loss_of(model, batch)).backward() or l)
        loss_of(ref_model, batch).backward()
        if t % sam_interval == 0:
            ref.first_step(); ref.zero_grad()
            loss_of(ref_model, batch).backward()
            ref.second_step()
        else:
            ref.plain_step()
        ref.zero_grad()
    assert max_diff(model, ref_model) < 1e-6
    # two passes on perturbed steps, one on the others
    assert [calls.count(t) for t in range(12)] == [2 if t % sam_interval == 0 else 1 for t in range(12)]
    assert opt.num_steps == 12
    # and the perturbed steps matter: plain AdamW ends far from both
    torch.manual_seed(9)
    adamw_model = TinyNet()
    adamw = torch.optim.AdamW(adamw_model.parameters(), **ADAMW)
    for batch in batches(12, seed=9):
        adamw.zero_grad(); loss_of(adamw_model, batch).backward(); adamw.step()
    assert max_diff(model, adamw_model) > 1e-4


def test_rho_zero_runs_the_closure_once_and_equals_the_base_optimizer():
    torch.manual_seed(10)
    a = TinyNet()
    b = copy.deepcopy(a)
    opt_a = fsam_ds.FSAM(a.named_parameters(), torch.optim.AdamW, rho=0.0, **ADAMW)
    opt_b = torch.optim.AdamW(b.parameters(), **ADAMW)
    calls = 0
    for batch in batches(4, seed=10):
        def closure():
            nonlocal calls
            calls += 1
            loss = loss_of(a, batch)
            loss.backward()
            return loss
        opt_a.step(closure)
        opt_b.zero_grad(); loss_of(b, batch).backward(); opt_b.step()
    assert calls == 4
    assert max_diff(a, b) == 0.0


def test_unsupported_deepspeed_setups_are_refused_naming_the_setting():
    """Tensor parallelism, unmanaged gradient accumulation, pipeline engines: refused by the
    config check (fsam_ds.initialize) and by the engine check (plain deepspeed.initialize)."""
    from types import SimpleNamespace

    from fsam_ds import deepspeed_adapter
    from fsam_ds.engine import refuse_unsupported_config
    with pytest.raises(ValueError, match="autotp_size"):
        refuse_unsupported_config({"tensor_parallel": {"autotp_size": 2}}, {})
    with pytest.raises(ValueError, match="managed_gradient_accumulation"):
        refuse_unsupported_config({"managed_gradient_accumulation": False}, {})
    with pytest.raises(ValueError, match="mpu"):
        refuse_unsupported_config({}, {"mpu": object()})
    with pytest.raises(ValueError, match=r"scheduler.params.warmup_num_steps"):
        refuse_unsupported_config({"scheduler": {"params": {"warmup_num_steps": "auto"}}}, {})
    refuse_unsupported_config({"tensor_parallel": {"autotp_size": 1}}, {})   # fine

    def engine(**kw):
        base = dict(mpu=None, autotp_size=lambda: 1, managed_gradient_accumulation=lambda: True)
        return SimpleNamespace(**{**base, **kw})
    deepspeed_adapter.check_supported_engine(engine())
    for kw, match in [(dict(mpu=object()), "tensor parallelism"),
                      (dict(autotp_size=lambda: 4), "autotp_size"),
                      (dict(managed_gradient_accumulation=lambda: False), "managed_gradient"),
                      (dict(pipeline_parallelism=True), "pipeline")]:
        with pytest.raises(deepspeed_adapter.UnsupportedDeepSpeedSetup, match=match):
            deepspeed_adapter.check_supported_engine(engine(**kw))


def test_a_tensor_without_a_layout_is_refused_not_guessed():
    from types import SimpleNamespace

    from fsam_ds import deepspeed_adapter
    from fsam_ds.shard_layout import ShardLayout
    known = torch.zeros(6)
    view = deepspeed_adapter.EngineView("zero12", SimpleNamespace(optimizer=object()),
                                        [((0, 0), known, ShardLayout.whole(6, False))], None)
    assert view.slot_key(known) == (0, 0)
    with pytest.raises(deepspeed_adapter.UnsupportedDeepSpeedSetup, match="no layout"):
        view.slot_key(torch.zeros(6))

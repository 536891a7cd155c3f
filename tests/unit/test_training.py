"""Training library: LARS against a naive reference, the schedule's closed form, and the loop's guarantees."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from volta.config import OptimConfig
from volta.training.engine import TorchEngine, zero_loss
from volta.training.lars import LARS, lars_param_groups
from volta.training.loop import LoopHooks, LoopSettings, LoopState, NonFiniteLossError, train
from volta.training.schedule import build_optimizer, build_scheduler, scaled_lrs, warmup_cosine_factor


def _naive_lars_step(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    excluded: list[bool],
    *,
    lr: float,
    wd: float,
    momentum: float,
    eta: float,
) -> None:
    for p, g, buf, ex in zip(params, grads, bufs, excluded):
        d = g.clone()
        if not ex:
            d = d + wd * p
            wn, gn = p.norm().item(), d.norm().item()
            if wn > 0 and gn > 0:
                d = d * (eta * wn / gn)
        buf.mul_(momentum).add_(d)
        p.sub_(lr * buf)


def test_lars_matches_naive_reference_over_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    groups = lars_param_groups(model, lr=0.3, bias_lr=0.3, weight_decay=1e-2)
    opt = LARS(groups, lr=0.3, weight_decay=1e-2, momentum=0.9, eta=0.02)
    ref = [p.detach().clone() for p in model.parameters()]
    excluded = [p.ndim <= 1 for p in model.parameters()]
    bufs = [torch.zeros_like(p) for p in ref]
    for step in range(4):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
        _naive_lars_step(ref, grads, bufs, excluded, lr=0.3, wd=1e-2, momentum=0.9, eta=0.02)
        for p, r in zip(model.parameters(), ref):
            assert torch.allclose(p, r, atol=1e-6), step
        with torch.no_grad():  # keep the reference exactly on the same trajectory
            for p, r in zip(model.parameters(), ref):
                r.copy_(p)


def test_lars_sharded_norms_equal_unsharded() -> None:
    # Two "ranks" each holding half of a parameter: summing partial squared norms gives the whole trust ratio.
    torch.manual_seed(1)
    w = torch.randn(10)
    g = torch.randn(10)
    whole = nn.Parameter(w.clone())
    whole.grad = g.clone()
    LARS([{"params": [whole]}], lr=0.1, weight_decay=0.01, eta=0.01).step()
    halves = [nn.Parameter(w[:5].clone()), nn.Parameter(w[5:].clone())]
    for h, gg in zip(halves, (g[:5], g[5:])):
        h.grad = gg.clone()
    partial = [
        torch.stack([halves[i].pow(2).sum(), (g[i * 5 : i * 5 + 5] + 0.01 * halves[i]).pow(2).sum()])
        for i in range(2)
    ]
    total = (partial[0] + partial[1]).detach()

    for h in halves:
        LARS(
            [{"params": [h]}], lr=0.1, weight_decay=0.01, eta=0.01, norm_all_reduce=lambda _t: total[None]
        ).step()
    assert torch.allclose(torch.cat([halves[0], halves[1]]), whole, atol=1e-7)


def test_param_groups_exclude_biases_and_norms() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = lars_param_groups(model, lr=1.0, bias_lr=0.1, weight_decay=0.5)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"] and groups[1]["lr"] == 0.1
    per_param = lars_param_groups(model, lr=1.0, bias_lr=0.1, weight_decay=0.5, one_group_per_param=True)
    assert len(per_param) == 4 and all(len(g["params"]) == 1 for g in per_param)


def test_schedule_closed_form_and_paper_scaling() -> None:
    assert warmup_cosine_factor(0, total_steps=100, warmup_steps=10, final_ratio=0.001) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, total_steps=100, warmup_steps=10, final_ratio=0.001) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, total_steps=100, warmup_steps=10, final_ratio=0.001) == pytest.approx(1.0)
    mid = warmup_cosine_factor(55, total_steps=100, warmup_steps=10, final_ratio=0.001)
    assert mid == pytest.approx(0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine_factor(100, total_steps=100, warmup_steps=10, final_ratio=0.001) == pytest.approx(
        0.001
    )
    assert scaled_lrs(OptimConfig(), 256) == pytest.approx((0.1, 0.0024))
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, OptimConfig(), global_batch_size=512)
    sched = build_scheduler(opt, OptimConfig(warmup_epochs=1), total_steps=20, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[4] == pytest.approx(0.2) and lrs[0] == pytest.approx(0.04)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"] == pytest.approx(0.0048 / 0.2)


# ------------------------------------------------------------------------------------------- loop
class _NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss with non-finite gradients (a backward overflow)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.full_like(grad, float("nan"))


class _Task(nn.Module):
    """A tiny regression task that can be made to produce a non-finite loss (``scale`` NaN) or finite loss with
    non-finite gradients (``nan_grad`` 1) on chosen batches."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        pred = self.lin(self.drop(batch["x"]))
        if float(batch.get("nan_grad", torch.tensor(0.0))) > 0:
            pred = _NaNGrad.apply(pred)
        loss = (pred.squeeze(-1) - batch["y"]).pow(2).mean() * batch["scale"]
        return {"loss": loss, "mse": loss.detach()}


def _data(n_micro: int, bad: set[tuple[int, int]] | None = None):
    def make_loader(epoch: int, start: int, *_: Any) -> list[dict[str, Any]]:
        out = []
        for i in range(start, n_micro):
            g = torch.Generator().manual_seed(epoch * 1000 + i)
            scale = torch.tensor(float("nan") if bad and (epoch, i) in bad else 1.0)
            out.append(
                {"x": torch.randn(4, 4, generator=g), "y": torch.randn(4, generator=g), "scale": scale}
            )
        return out

    return make_loader


def _engine(seed: int = 0, accum: int = 2) -> TorchEngine:
    torch.manual_seed(seed)
    task = _Task()
    opt = torch.optim.SGD(task.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return TorchEngine(task, opt, sched, grad_accum=accum)


def _settings(total: int, **kw: Any) -> LoopSettings:
    base = {
        "total_steps": total,
        "micro_per_epoch": 6,
        "grad_accum": 2,
        "global_batch_size": 8,
        "log_every": 1,
        "checkpoint_every": 3,
    }
    base.update(kw)
    return LoopSettings(**base)


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    losses_full: list[float] = []
    full = _engine()
    train(
        full,
        _settings(8),
        LoopHooks(make_loader=_data(6), on_step=lambda s, m: losses_full.append(m["train/loss"])),
    )

    saved: list[Path] = []
    first = _engine()
    losses_a: list[float] = []

    def checkpoint(state: LoopState, metrics: dict[str, float]) -> None:
        d = tmp_path / f"ckpt-{state.step}"
        first.save(d, state.to_dict())
        saved.append(d)

    train(
        first,
        _settings(5),
        LoopHooks(
            make_loader=_data(6), checkpoint=checkpoint, on_step=lambda s, m: losses_a.append(m["train/loss"])
        ),
    )
    assert [p.name for p in saved] == ["ckpt-3", "ckpt-5"]
    resumed = _engine(seed=123)  # different init: everything must come from the checkpoint
    state = LoopState.from_dict(resumed.load(saved[0]))
    assert (state.step, state.epoch, state.micro_in_epoch) == (3, 0, 6)  # rolls over lazily
    losses_b: list[float] = []
    train(
        resumed,
        _settings(8),
        LoopHooks(make_loader=_data(6), on_step=lambda s, m: losses_b.append(m["train/loss"])),
        state,
    )
    assert losses_a[:3] + losses_b == pytest.approx(losses_full, rel=1e-6, abs=1e-7)
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


def test_nonfinite_micro_batches_are_skipped_and_counted() -> None:
    eng = _engine()
    before = [p.detach().clone() for p in eng.module.parameters()]
    # Both micro-batches of step 1 are bad: that step must not change the parameters beyond momentum.
    state = train(eng, _settings(1), LoopHooks(make_loader=_data(6, bad={(0, 0), (0, 1)})))
    assert state.nonfinite_skipped == 2 and state.nonfinite_in_row == 1
    for p, b in zip(eng.module.parameters(), before):
        assert torch.equal(p, b)  # zero gradient and empty momentum: nothing moved
    assert all(torch.isfinite(p).all() for p in eng.module.parameters())
    eng2 = _engine()
    state2 = train(eng2, _settings(3), LoopHooks(make_loader=_data(6, bad={(0, 2)})))
    assert state2.nonfinite_skipped == 1 and state2.nonfinite_in_row == 0
    assert all(torch.isfinite(p).all() for p in eng2.module.parameters())


def _nan_grad_data(n_micro: int, bad_epochs_micros: set[tuple[int, int]]):
    base = _data(n_micro)

    def make_loader(epoch: int, start: int, *_: Any) -> list[dict[str, Any]]:
        batches = base(epoch, start)
        for offset, b in enumerate(batches):
            b["nan_grad"] = torch.tensor(float((epoch, start + offset) in bad_epochs_micros))
        return batches

    return make_loader


def test_nonfinite_gradients_with_a_finite_loss_skip_the_update_and_count() -> None:
    eng = _engine()
    before = [p.detach().clone() for p in eng.module.parameters()]
    lr_before = eng.lr()
    state = train(eng, _settings(1), LoopHooks(make_loader=_nan_grad_data(6, {(0, 1)})))
    assert state.nonfinite_skipped == 0  # the loss itself was finite
    assert state.nonfinite_grad_steps == 1 and state.nonfinite_in_row == 1
    for p, b in zip(eng.module.parameters(), before, strict=True):
        assert torch.equal(p, b)  # the update was skipped: no NaN reached the weights
    assert eng.lr() == lr_before  # and the schedule did not advance
    # Consecutive bad steps abort like non-finite losses do.
    every = {(e, i) for e in range(3) for i in range(6)}
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradients in 3 consecutive steps"):
        train(
            _engine(), _settings(10, max_nonfinite_in_row=3), LoopHooks(make_loader=_nan_grad_data(6, every))
        )


def test_abort_after_k_nonfinite_steps_in_a_row() -> None:
    bad = {(e, i) for e in range(3) for i in range(6)}
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(_engine(), _settings(10, max_nonfinite_in_row=3), LoopHooks(make_loader=_data(6, bad=bad)))


def test_short_loader_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="expected 6"):
        train(_engine(), _settings(5), LoopHooks(make_loader=_data(4)))


def test_any_rank_makes_every_rank_skip() -> None:
    # A collective that reports a bad loss elsewhere: this rank must skip although its own loss is finite.
    state = train(_engine(), _settings(2), LoopHooks(make_loader=_data(6), any_rank=lambda flag: True))
    assert state.nonfinite_skipped == 4


def test_zero_loss_gives_exact_zero_gradients() -> None:
    m = nn.Linear(3, 2)
    zero_loss(m).backward()
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in m.parameters())


def test_preemption_checkpoints_once() -> None:
    calls: list[int] = []
    train(
        _engine(),
        _settings(6, checkpoint_every=100),
        LoopHooks(make_loader=_data(6), preempted=lambda: True, checkpoint=lambda s, m: calls.append(s.step)),
    )
    assert calls == [1, 6]


def test_resume_is_exact_even_when_creating_the_loader_draws_random_numbers(tmp_path: Path) -> None:
    # A DataLoader draws its base seed from the global generator when iterated: a resumed run creates its loader
    # at a different step than the uninterrupted one, which must not change the step's dropout masks.
    base = _data(6)

    def drawing_loader(epoch: int, start: int, *_: Any) -> list[dict[str, Any]]:
        torch.rand(3)
        return base(epoch, start)

    full_losses: list[float] = []
    train(
        _engine(),
        _settings(6),
        LoopHooks(make_loader=drawing_loader, on_step=lambda s, m: full_losses.append(m["train/loss"])),
    )
    first = _engine()
    saved = tmp_path / "c"
    train(
        first,
        _settings(2),  # mid-epoch: the resumed run creates a loader where the uninterrupted one does not
        LoopHooks(make_loader=drawing_loader, checkpoint=lambda s, m: first.save(saved, s.to_dict())),
    )
    resumed = _engine()
    state = LoopState.from_dict(resumed.load(saved))
    tail: list[float] = []
    train(
        resumed,
        _settings(6),
        LoopHooks(make_loader=drawing_loader, on_step=lambda s, m: tail.append(m["train/loss"])),
        state,
    )
    assert tail == pytest.approx(full_losses[2:], rel=1e-6)


def test_gate_lr_puts_the_fusion_gates_in_their_own_group_of_the_real_optimizer() -> None:
    from volta.config import load_config
    from volta.models.factory import build_model
    from volta.training.schedule import build_optimizer

    config = load_config(
        "configs/debug.yaml", ["optim.name=adamw", "optim.gate_lr=0.5", "optim.bias_lr=0.01"]
    )
    model = build_model(config.model, vocab_size=64)
    gates = {id(p) for n, p in model.named_parameters() if n.split(".")[-1] == "gate"}
    assert len(gates) == 2 * config.model.fusion_depth
    opt = build_optimizer(model, config.optim, global_batch_size=512)  # batch 512: the paper scaling is 1
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_lr[0.5] == gates and all(g["weight_decay"] == 0.0 for g in opt.param_groups if g["lr"] == 0.5)
    assert not gates & by_lr[0.01]
    # without gate_lr the gates stay with the biases (the groups of the paper's recipes are unchanged)
    plain = build_optimizer(model, config.optim.model_copy(update={"gate_lr": None}), global_batch_size=512)
    assert len(plain.param_groups) == 2 and gates <= {id(p) for p in plain.param_groups[1]["params"]}
    # an AdamW step moves a gate by about its own lr, not the biases' lr
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters() if id(p) in gates]
    opt.step()
    after = [p.detach() for p in model.parameters() if id(p) in gates]
    assert all(torch.allclose(a - b, torch.full_like(a, -0.5), atol=1e-3) for a, b in zip(after, before))

"""GOT loss speed: ``volta.losses.got.got_loss`` against two baselines measured in the same run.

(a) a straightforward batched implementation of the same iterations, written the way the authors' code does
it: plain ``exp``/matmul loops over the padded tensors, autograd recording the unrolled IPOT loop of WD (the
GW plan is solved under ``no_grad``, which only helps this baseline), two-matmul autograd backward of the Gram
matrices. Same maths as ours (masked uniform marginals, per-sample pruning), so values agree up to fp32
rounding. (b) POT's exact solvers per sample (``ot.emd2`` + ``ot.gromov.gromov_wasserstein2``) in a Python
loop: what a user would otherwise call. Timed forward+backward with POT's own gradients (torch backend), like
ours, and forward only on numpy arrays (POT's fastest path, no gradients); its values differ from IPOT's by the
solver gap.

Paper shape: B = 32, 144 patches, 30 token slots of which 12-20 are real, dim 1024, WD 30 IPOT iterations,
GW 5 outer x 20 inner. Run: ``python -m bench.got [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import ot
import torch
import torch.nn.functional as F
from torch import Tensor

from volta.config import GOTContrastConfig
from volta.losses.got import got_contrastive_loss, got_loss

SETTINGS: dict[str, Any] = dict(
    wd_weight=0.1,
    gwd_weight=0.1,
    ipot_beta=0.5,
    ipot_iters=30,
    gw_beta=0.1,
    gw_outer_iters=5,
    gw_inner_iters=20,
    prune_fraction=0.1,
    prune_detach=False,  # the authors' differentiable threshold, which baseline (a) implements
)


def make_batch(
    batch: int = 32, patches: int = 144, tokens: int = 30, dim: int = 1024, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Features with shared structure (mixtures of 32 concept vectors + noise) and 12-20 real tokens per caption."""
    gen = torch.Generator().manual_seed(seed)
    concepts = torch.randn(32, dim, generator=gen)  # (K, D)
    image = torch.softmax(3 * torch.randn(batch, patches, 32, generator=gen), -1) @ concepts  # (B, P, D)
    text = torch.softmax(3 * torch.randn(batch, tokens, 32, generator=gen), -1) @ concepts  # (B, T, D)
    image = image + 0.3 * torch.randn(image.shape, generator=gen)
    text = text + 0.3 * torch.randn(text.shape, generator=gen)
    lengths = torch.randint(12, 21, (batch,), generator=gen)  # (B,)
    text_mask = torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    image_mask = torch.ones(batch, patches, dtype=torch.bool)
    return image, text, image_mask, text_mask


# ------------------------------------------------------------------------------------- baseline (a)
def _baseline_prune(cost: Tensor, valid: Tensor, fraction: float) -> Tensor:
    low = cost.masked_fill(~valid, float("inf")).amin(dim=(1, 2), keepdim=True)
    high = cost.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    return torch.relu(cost - (low + fraction * (high - low)))


def _baseline_ipot(cost: Tensor, a: Tensor, b: Tensor, beta: float, iters: int) -> Tensor:
    kernel = torch.exp(-cost / beta)  # (B, n, m)
    plan = torch.ones_like(cost)
    sigma = b.unsqueeze(-1)  # (B, m, 1): zero on padding, so padding columns never contribute
    for _ in range(iters):
        q = kernel * plan
        delta = a.unsqueeze(-1) / (torch.bmm(q, sigma) + 1e-30)  # (B, n, 1)
        sigma = b.unsqueeze(-1) / (torch.bmm(q.transpose(1, 2), delta) + 1e-30)  # (B, m, 1)
        plan = delta * q * sigma.transpose(1, 2)
    return plan


def baseline_got(image: Tensor, text: Tensor, image_mask: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
    """Baseline (a): the same GOT maths as a plain batched loop over the padded tensors."""
    s = SETTINGS
    a = image_mask.to(image.dtype) / image_mask.sum(1, keepdim=True)  # (B, P)
    b = text_mask.to(text.dtype) / text_mask.sum(1, keepdim=True)  # (B, T)
    vn, tn = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    cost = _baseline_prune(
        1 - torch.bmm(vn, tn.transpose(1, 2)),
        image_mask[:, :, None] & text_mask[:, None, :],
        s["prune_fraction"],
    )
    plan = _baseline_ipot(cost, a, b, s["ipot_beta"], s["ipot_iters"])
    wd = (cost * plan).sum((1, 2))
    cs = _baseline_prune(
        1 - torch.bmm(vn, vn.transpose(1, 2)),
        image_mask[:, :, None] & image_mask[:, None, :],
        s["prune_fraction"],
    )
    ct = _baseline_prune(
        1 - torch.bmm(tn, tn.transpose(1, 2)),
        text_mask[:, :, None] & text_mask[:, None, :],
        s["prune_fraction"],
    )
    cs = cs * (image_mask[:, :, None] & image_mask[:, None, :])
    ct = ct * (text_mask[:, :, None] & text_mask[:, None, :])
    const = torch.bmm(cs**2, a.unsqueeze(-1)) + torch.bmm(ct**2, b.unsqueeze(-1)).transpose(1, 2)  # (B, P, T)
    with torch.no_grad():
        gamma = a.unsqueeze(-1) * b.unsqueeze(1)
        for _ in range(s["gw_outer_iters"]):
            lin = const - 2 * torch.bmm(torch.bmm(cs, gamma), ct.transpose(1, 2))
            gamma = _baseline_ipot(lin, a, b, s["gw_beta"], s["gw_inner_iters"])
    gwd = ((const - 2 * torch.bmm(torch.bmm(cs, gamma), ct.transpose(1, 2))) * gamma).sum((1, 2))
    loss = (s["wd_weight"] * wd + s["gwd_weight"] * gwd).mean()
    return {"wd": wd, "gwd": gwd, "loss": loss}


# ------------------------------------------------------------------------------------- baseline (b)
def pot_exact(
    image: Tensor, text: Tensor, image_mask: Tensor, text_mask: Tensor, *, differentiable: bool = False
) -> dict[str, Tensor]:
    """Baseline (b): POT's exact EMD and conditional-gradient GW per sample on the unpadded, pruned costs.

    ``differentiable=False`` hands POT numpy arrays (forward only, the fastest way to call it); ``True`` hands it
    torch tensors, so that ``ot.emd2`` and ``gromov_wasserstein2`` return values with POT's own gradients (the
    plan for EMD, the envelope gradient for GW) and the loss trains the features: what a user writing a GOT
    training loss with POT would call.
    """
    from volta.losses.got import cosine_cost, prune_cost

    f = SETTINGS["prune_fraction"]
    wds, gwds = [], []
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for i in range(image.shape[0]):
            v, t = (
                image[i][image_mask[i]].unsqueeze(0),
                text[i][text_mask[i]].unsqueeze(0),
            )  # (1, P, D), (1, T, D)
            c = prune_cost(cosine_cost(v, t), None, fraction=f)[0].double()  # (P, T)
            cs = prune_cost(cosine_cost(v), None, fraction=f)[0].double()  # (P, P)
            ct = prune_cost(cosine_cost(t), None, fraction=f)[0].double()  # (T, T)
            p = torch.full((v.shape[1],), 1.0 / v.shape[1], dtype=torch.float64)
            q = torch.full((t.shape[1],), 1.0 / t.shape[1], dtype=torch.float64)
            if differentiable:
                wds.append(ot.emd2(p, q, c))
                gwds.append(ot.gromov.gromov_wasserstein2(cs, ct, p, q, loss_fun="square_loss"))
            else:
                pn, qn = p.numpy(), q.numpy()
                wds.append(torch.tensor(ot.emd2(pn, qn, c.numpy()), dtype=torch.float64))
                gwds.append(
                    torch.tensor(
                        ot.gromov.gromov_wasserstein2(cs.numpy(), ct.numpy(), pn, qn, loss_fun="square_loss"),
                        dtype=torch.float64,
                    )
                )
    wd, gwd = torch.stack(wds), torch.stack(gwds)
    return {"wd": wd, "gwd": gwd, "loss": (SETTINGS["wd_weight"] * wd + SETTINGS["gwd_weight"] * gwd).mean()}


def pot_exact_differentiable(
    image: Tensor, text: Tensor, image_mask: Tensor, text_mask: Tensor
) -> dict[str, Tensor]:
    """Baseline (b) with POT's gradients (torch backend), for forward+backward timing."""
    return pot_exact(image, text, image_mask, text_mask, differentiable=True)


# ------------------------------------------------------------------------------------------ timing
def _ours(image: Tensor, text: Tensor, image_mask: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
    return got_loss(image, text, image_mask, text_mask, **SETTINGS)


def _ours_with_contrast(
    image: Tensor, text: Tensor, image_mask: Tensor, text_mask: Tensor
) -> dict[str, Tensor]:
    """GOT plus the optional in-batch contrast (``loss.got.contrastive`` defaults, the demo's weight 0.1)."""
    contrast = GOTContrastConfig().kwargs(ipot_beta=float(SETTINGS["ipot_beta"]))
    out = got_loss(image, text, image_mask, text_mask, **SETTINGS)
    nce = got_contrastive_loss(image, text, image_mask, text_mask, **contrast)
    return {**out, "loss": out["loss"] + 0.1 * nce["loss"]}


def _step(fn: Callable[..., dict[str, Tensor]], inputs: tuple[Tensor, ...], backward: bool) -> float:
    image, text, image_mask, text_mask = inputs
    image = image.detach().requires_grad_(backward)
    text = text.detach().requires_grad_(backward)
    start = time.perf_counter()
    out = fn(image, text, image_mask, text_mask)
    if backward:
        out["loss"].backward()
    return time.perf_counter() - start


def run(repeats: int = 10) -> dict[str, Any]:
    """Time ours, baseline (a) and POT (b) interleaved (median of ``repeats`` after a warm-up); compare values."""
    torch.set_num_threads(2)
    inputs = make_batch()
    fns: dict[str, tuple[Callable[..., dict[str, Tensor]], bool]] = {
        "ours (fwd+bwd)": (_ours, True),
        "baseline (a) (fwd+bwd)": (baseline_got, True),
        "ours (fwd only)": (_ours, False),
        "ours + contrast (fwd+bwd)": (_ours_with_contrast, True),
        "POT exact (b) (fwd+bwd)": (pot_exact_differentiable, True),
        "POT exact (b) (fwd only)": (pot_exact, False),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn, backward in fns.values():
        _step(fn, inputs, backward)  # warm-up
    for _ in range(repeats):
        for name, (fn, backward) in fns.items():
            times[name].append(_step(fn, inputs, backward))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}

    with torch.no_grad():
        ours, base, exact = _ours(*inputs), baseline_got(*inputs), pot_exact(*inputs)

    def rel(x: Tensor, y: Tensor) -> float:
        return float(((x.double() - y.double()).abs().max() / y.double().abs().max()).item())

    return {
        "median_s": median,
        "min_s": best,
        "speedup_vs_baseline": median["baseline (a) (fwd+bwd)"] / median["ours (fwd+bwd)"],
        "speedup_vs_pot": median["POT exact (b) (fwd+bwd)"] / median["ours (fwd+bwd)"],
        "speedup_vs_baseline_min": best["baseline (a) (fwd+bwd)"] / best["ours (fwd+bwd)"],
        "speedup_vs_pot_min": best["POT exact (b) (fwd+bwd)"] / best["ours (fwd+bwd)"],
        "speedup_vs_pot_fwd_only_baseline": median["POT exact (b) (fwd only)"] / median["ours (fwd+bwd)"],
        "speedup_vs_pot_fwd_only": median["POT exact (b) (fwd only)"] / median["ours (fwd only)"],
        "contrast_overhead": median["ours + contrast (fwd+bwd)"] / median["ours (fwd+bwd)"],
        "wd_rel_diff_vs_baseline": rel(ours["wd"], base["wd"]),
        "gwd_rel_diff_vs_baseline": rel(ours["gwd"], base["gwd"]),
        "loss_rel_diff_vs_baseline": rel(ours["loss"], base["loss"]),
        "wd_mean": {"ours": float(ours["wd"].mean()), "pot": float(exact["wd"].mean())},
        "gwd_mean": {"ours": float(ours["gwd"].mean()), "pot": float(exact["gwd"].mean())},
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    result = run(parser.parse_args(argv).repeats)
    print(f"GOT loss, B=32, P=144, T=30 (12-20 real), D=1024, torch threads=2, median of {result['repeats']}")
    print(f"{'implementation':<28}{'median (ms)':>12}{'min (ms)':>12}")
    for name, seconds in result["median_s"].items():
        print(f"{name:<28}{seconds * 1e3:>12.1f}{result['min_s'][name] * 1e3:>12.1f}")
    print(
        f"speed-up vs baseline (a): {result['speedup_vs_baseline']:.2f}x median, "
        f"{result['speedup_vs_baseline_min']:.2f}x min"
    )
    print(
        f"speed-up vs POT exact (b), both fwd+bwd: {result['speedup_vs_pot']:.2f}x median, "
        f"{result['speedup_vs_pot_min']:.2f}x min"
    )
    print(
        f"ours fwd+bwd vs POT's forward alone: {result['speedup_vs_pot_fwd_only_baseline']:.2f}x; "
        f"forward vs forward: {result['speedup_vs_pot_fwd_only']:.2f}x"
    )
    print(
        f"max relative difference vs (a): wd {result['wd_rel_diff_vs_baseline']:.1e}, "
        f"gwd {result['gwd_rel_diff_vs_baseline']:.1e}, loss {result['loss_rel_diff_vs_baseline']:.1e}"
    )
    print(
        f"in-batch contrast (B x B plans, 1 IPOT step) on top of GOT: {result['contrast_overhead']:.2f}x the time"
    )
    wd, gwd = result["wd_mean"], result["gwd_mean"]
    print(f"mean wd: ours (IPOT) {wd['ours']:.5f} vs POT exact {wd['pot']:.5f}")
    print(f"mean gwd: ours (proximal GW) {gwd['ours']:.5f} vs POT (conditional gradient) {gwd['pot']:.5f}")


if __name__ == "__main__":
    main()

"""Cost of one 25-GMM SGD step for all seeds, measured side by side in one run (by hand, not CI).

    python benchmarks/gmm_step.py [--runs 5] [--repeat 400] [--compile]

For each task (joint, transformed marginal, transformed conditional) and the same noise, times
  hand:      the hand-written path gradients the simulation uses (biglearn.simulate.gmm25);
  autograd:  autograd through the `reference_*` losses built on biglearn.simulate.mixture;
  compiled:  torch.compile of the hand-written step (with --compile; compilation time shown apart),
and prints microseconds per step and the ratios to `hand`, plus the projected time of the
published 10,000 x 20 schedule for that many seeds.
"""

from __future__ import annotations

import argparse
import time

import torch

from biglearn.simulate.gmm25 import (
    Target,
    conditional_grad,
    joint_grad,
    marginal_grad,
    reference_conditional_loss,
    reference_joint_loss,
    reference_marginal_loss,
)
from biglearn.simulate.mixture import Mixture
from biglearn.transforms import haar_orthogonal


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=400)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = Mixture.paper("gmm25")
    r, k, n, c = args.runs, 25, 100, 4
    theta = torch.randn(r, k, 5, generator=g, dtype=torch.float64)
    theta[..., :2] *= 3
    theta[..., 2:] = -1.0
    z = torch.randint(0, k, (r, n), generator=g)
    eps = torch.randn(r, n, 2, generator=g, dtype=torch.float64)
    a = haar_orthogonal(2, g, batch=r, dtype=torch.float64)
    s = 3 * torch.randn(r, c, generator=g, dtype=torch.float64)
    cond_eps = torch.randn(r, c, k, generator=g, dtype=torch.float64)
    view = Target.view(data, a)

    def autograd(loss_fn):
        def step():
            leaf = theta.clone().requires_grad_()
            return torch.autograd.grad(loss_fn(leaf).sum(), [leaf])[0]

        return step

    tasks = {
        "joint": (
            lambda: joint_grad(theta, Target.joint(data), z, eps),
            autograd(lambda th: reference_joint_loss(th, data, z, eps)),
        ),
        "marginal": (
            lambda: marginal_grad(theta, a[:, 0], view, z, eps),
            autograd(lambda th: reference_marginal_loss(th, a[:, 0], data, z, eps)),
        ),
        "conditional": (
            lambda: conditional_grad(theta, a, view, s, cond_eps),
            autograd(lambda th: reference_conditional_loss(th, a, data, s, cond_eps)),
        ),
    }
    compiled = (
        {
            "joint": lambda fn=torch.compile(joint_grad, dynamic=False): fn(theta, Target.joint(data), z, eps),
            "marginal": lambda fn=torch.compile(marginal_grad, dynamic=False): fn(theta, a[:, 0], view, z, eps),
            "conditional": lambda fn=torch.compile(conditional_grad, dynamic=False): fn(theta, a, view, s, cond_eps),
        }
        if args.compile
        else {}
    )
    print(f"one SGD step for {r} seeds, 1 thread, float64")
    print("task         hand us  autograd us  ratio" + ("  compiled us  ratio  compile s" if args.compile else ""))
    for name, (hand, auto) in tasks.items():
        t_hand, t_auto = timed(hand, args.repeat), timed(auto, max(args.repeat // 4, 10))
        line = f"{name:<12} {t_hand * 1e6:7.0f}  {t_auto * 1e6:11.0f}  {t_auto / t_hand:4.1f}x"
        if args.compile:
            start = time.perf_counter()
            compiled[name]()
            compile_s = time.perf_counter() - start
            t_comp = timed(compiled[name], args.repeat)
            line += f"  {t_comp * 1e6:11.0f}  {t_hand / t_comp:4.1f}x  {compile_s:9.1f}"
        print(line)
        if name == "marginal":
            print(f"{'':12} published schedule (10,000 x 20 marginal-type steps): ~{t_hand * 200000:.0f} s of steps")


if __name__ == "__main__":
    main()

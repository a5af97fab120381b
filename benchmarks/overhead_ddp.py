"""How much does babysitting cost a DistributedDataParallel run? One figure for the README.

The digits MLP trained with DDP on 2 CPU ranks (gloo) by a bare loop and by the same loop with
``Babysitter.step(loss)`` every step, interleaved (bare, babysat, bare, …) for several rounds;
we report the median throughput ratio (rank 0's clock; DDP keeps the ranks in step). The
babysat loop pays for what :mod:`trainer.distributed` adds: a loss all-reduce and a command
broadcast every ``--sync-every`` steps, plus rank 0's store writes. Goal: ≤ 2 % overhead.

    .venv/bin/python benchmarks/overhead_ddp.py [--rounds 21 --steps 500 --sync-every 10]

The script starts itself under ``python -m torch.distributed.run --nproc_per_node 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from overhead import _loop  # the same loop as the single-process benchmark

REPO = Path(__file__).resolve().parent.parent



def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer import Babysitter
    from trainer.tasks import make_task

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    task = make_task("digits", seed=0)

    # One model for all rounds (building a DDP wrapper takes seconds): throughput does not
    # depend on the weights, and every round alternates bare and babysat on the same wrapper.
    model = make_task("digits", seed=0).model
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    bare, babysat = [], []
    for i in range(args.rounds):
        bare.append(_loop(task, ddp, opt, args.steps, None, seed=rank, ready=dist.barrier))
        with Babysitter(opt, Path(args.tmp) / f"r{i}", model=model,
                        sync_every=args.sync_every) as bs:
            babysat.append(_loop(task, ddp, opt, args.steps, bs, seed=rank, ready=dist.barrier))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        ratios = [b / a for a, b in zip(bare, babysat)]
        print(json.dumps({"bare_steps_per_s": statistics.median(bare),
                          "quartiles": statistics.quantiles(ratios, n=4),
                          "babysat_steps_per_s": statistics.median(babysat),
                          "ratio": statistics.median(ratios), "ratios": ratios}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
             "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(_free_port()), __file__, "--worker", "--tmp", tmp,
             "--rounds", str(args.rounds), "--steps", str(args.steps),
             "--sync-every", str(args.sync_every)],
            capture_output=True, text=True, env=env, cwd=REPO, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        sys.exit(f"benchmark failed ({out.returncode}):\n{out.stderr[-3000:]}")
    t = json.loads(lines[-1])
    print(f"| DDP loop, 2 ranks (gloo, CPU) | median steps/s |\n|---|---|\n"
          f"| bare | {t['bare_steps_per_s']:.0f} |\n"
          f"| with Babysitter (sync every {args.sync_every}) | "
          f"{t['babysat_steps_per_s']:.0f} |\n")
    print(f"median throughput ratio (babysat / bare, {args.rounds} interleaved rounds of "
          f"{args.steps} steps): {t['ratio']:.3f}  → overhead {100 * (1 - t['ratio']):.1f} %")
    q1, _, q3 = t["quartiles"]
    print(f"ratio quartiles {q1:.3f} … {q3:.3f}; per-round ratios: "
          + ", ".join(f"{r:.3f}" for r in t["ratios"]))


if __name__ == "__main__":
    main()

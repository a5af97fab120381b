"""``panda search``: caviar mode from the command line.

    panda search --task digits --trials 40 --parallel 2 --rounds 2 --epochs 10
    panda search --task digits --lr 1e-4:1 --beta 0.9:0.999 --batch-size 32,64 --json
    panda search --resume digits-20260101-120000       # after kill -9: re-runs the cut trials
    panda search --join NAME --store postgresql://…    # more workers, from another machine

Ranges are ``LOW:HIGH`` (searched on the parameter's scale) or one value (fixed); choices are
comma-separated. Bad input exits 2 with one line on stderr and starts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

from trainer.config import OPTIMIZERS, TASKS
from trainer.search.config import CHECKS, PRUNERS, SAMPLERS, SearchConfig
from trainer.search.space import SearchSpace, describe, parse_choices, parse_range
from trainer.store.address import store_url
from trainer.store.base import StoreError, first_line

log = logging.getLogger(__name__)

PROGRESS_S = 1.0     # how often the command reports newly finished trials
STOP_GRACE_S = 20.0  # interrupted workers get this long to record their cut trials
STUDY_FLAGS = ("task", "trials", "rounds", "epochs", "sampler", "prune", "optimizer", "seed",
               "study", "lr", "beta", "weight_decay", "batch_size", "hidden", "decay", "top",
               "margin", "step_delay")  # what a study fixes: not for --join / --resume


class SearchInputError(ValueError):
    """Bad input for ``panda search``: one line on stderr, exit 2, nothing started."""


def add_search_parser(add) -> None:
    """Add ``panda search`` with ``add(name, func, help, json_flag=...)``, the helper of
    :func:`trainer.cli.build_parser` that adds ``--runs-dir`` and ``--store``."""
    p = add("search", cmd_search, "caviar mode: search hyperparameters with Optuna (random "
            "search, Hyperband, coarse to fine); every trial is a run you can babysit",
            json_flag=True)
    p.add_argument("--task", choices=TASKS.options, help="built-in task to train (default digits)")
    for flag, text in (("trials", "trials in all rounds together (default 20)"),
                       ("parallel", "trial processes on this machine (default 1)"),
                       ("rounds", "coarse-to-fine rounds (default 1)"),
                       ("epochs", "epochs per trial (default 10)")):
        p.add_argument(f"--{flag}", type=CHECKS[flag].parser(flag), help=text)
    p.add_argument("--sampler", choices=SAMPLERS.options, help="random (default), tpe, or grid "
                   "(the baseline: k values per log-scale parameter, --trials must be k^d × "
                   "choices)")
    p.add_argument("--prune", choices=PRUNERS.options, help="hyperband (default), median or none")
    p.add_argument("--optimizer", choices=OPTIMIZERS.options, help="default sgd")
    p.add_argument("--seed", type=int, help="seeds the sampler and the trials (default 0)")
    p.add_argument("--study", metavar="NAME", help="the study's name (default TASK-TIME)")
    p.add_argument("--lr", metavar="LOW:HIGH", help="LR range, log scale (default from an LR "
                   "range test: [max stable LR/100, max stable LR]), or one value")
    p.add_argument("--beta", "--momentum", dest="beta", metavar="LOW:HIGH",
                   help="momentum β range, sampled as 1−β on a log scale (default 0.9:0.999)")
    p.add_argument("--weight-decay", metavar="LOW:HIGH", help="log scale, plus exactly 0 "
                   "(default 1e-5:1e-2), or one value")
    p.add_argument("--no-zero-weight-decay", action="store_true",
                   help="do not also try a weight decay of 0")
    p.add_argument("--batch-size", metavar="B,...", help="choices (default 16,32,64,128)")
    p.add_argument("--hidden", metavar="H,...", help="hidden units, choices (default 32,64,128)")
    p.add_argument("--decay", metavar="SHAPE,...", help="LR decay shapes (default all: "
                   "constant,exponential,inverse_time,step,cosine)")
    p.add_argument("--top", type=float, help="a round is built around this share of the "
                   "previous round's trials (default 0.25)")
    p.add_argument("--margin", type=float, help="... widened by this share of the box's log "
                   "width on each side (default 0.15)")
    p.add_argument("--step-delay", type=float, help="seconds per step (slows trials down to "
                   "watch them)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--resume", metavar="STUDY", help="continue a study: keep its finished "
                       "trials, re-run the cut ones, run the rest")
    which.add_argument("--join", metavar="STUDY", help="add --parallel workers to a running "
                       "study (another machine: same --store)")
    which.add_argument("--worker", metavar="STUDY", help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The SearchConfig a ``panda search`` command line asks for (SpaceError / ValueError)."""
    space: dict[str, Any] = {}
    for name in ("lr", "beta", "weight_decay"):
        text = getattr(args, name)
        if text is not None:
            space[name] = parse_range(name, text)
    for name, kind in (("batch_size", int), ("hidden", int), ("decay", str)):
        text = getattr(args, name)
        if text is not None:
            space[name] = parse_choices(name, text, kind)
    if args.no_zero_weight_decay:
        space["weight_decay_zero"] = False
    given = {name: getattr(args, name) for name in (
        "task", "trials", "parallel", "rounds", "epochs", "sampler", "prune", "optimizer",
        "seed", "study", "top", "margin", "step_delay") if getattr(args, name) is not None}
    given.setdefault("task", "digits")
    return SearchConfig(space=SearchSpace.from_dict(space), **given).validate()


def cmd_search(args: argparse.Namespace) -> int:
    try:
        return _search(args)
    except SearchInputError as err:
        print(f"panda: error: {first_line(err)}", file=sys.stderr)
        return 2


def _search(args: argparse.Namespace) -> int:
    try:
        url = store_url(args.store)
    except ValueError as err:
        raise SearchInputError(str(err)) from None
    root = url or args.runs_dir
    existing = args.resume or args.join or args.worker
    if existing:
        given = [name for name in STUDY_FLAGS if getattr(args, name, None) is not None]
        if given:
            raise SearchInputError(f"--{given[0].replace('_', '-')} is fixed by the study; "
                                   "--resume / --join take only --parallel")
    else:
        try:
            cfg = config_from_args(args)
        except ValueError as err:  # SpaceError, a bad name or budget
            raise SearchInputError(str(err)) from None
        if args.parallel is not None and args.parallel < 1:
            raise SearchInputError(f"parallel must be at least 1, got {args.parallel}")
    try:
        from trainer.search import study as studies
        from trainer.search.api import prepare
        from trainer.search.worker import start_workers, work
    except ImportError as err:
        raise SearchInputError(f"panda search needs Optuna ({first_line(err)}): pip install "
                               "'panda-babysitter[search]'") from None
    if args.worker:
        from trainer.search.worker import TrialCut

        try:
            work(args.worker, root, args.runs_dir, url, index=args.worker_index)
        except (TrialCut, KeyboardInterrupt) as cut:  # SIGTERM / Ctrl-C: recorded as cut
            log.info("worker stopped (%s): `panda search --resume %s` re-runs its trial",
                     cut, args.worker)
            return 130
        return 0
    try:
        if existing:
            storage = studies.open_storage(root, existing)
            study, cfg = studies.load(existing, storage)
            if args.resume:
                requeued = studies.requeue_cut_trials(study, storage)
                print(f"resuming {existing}: kept {_finished(study)} finished trial(s), "
                      f"re-queued {len(requeued)} cut trial(s)", file=sys.stderr)
        else:
            cfg, study = prepare(cfg, root)
    except (ValueError, StoreError) as err:  # StudyError, a store that cannot be reached
        raise SearchInputError(str(err)) from None
    parallel = args.parallel or cfg.parallel
    # Joined and resumed workers: indices no earlier worker had, so no sampler repeats another.
    first = 1 + secrets.randbelow(2**31) if existing else 0
    procs = start_workers(study.study_name, args.runs_dir, url, parallel, first_index=first)
    print(f"study {study.study_name}: {cfg.trials} trials of {cfg.task}, {parallel} worker(s) "
          f"here; watch them with `panda dashboard"
          f"{' --store …' if url else f' --runs-dir {args.runs_dir}'}`", file=sys.stderr)
    return _wait(args, study, root, procs)


def _finished(study) -> int:
    from trainer.search.study import FINISHED, is_cut, is_surplus

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in FINISHED and not is_cut(t) and not is_surplus(t))


def _wait(args: argparse.Namespace, study, root: str, procs: list[subprocess.Popen]) -> int:
    """Report trials as they finish until the workers exit; Ctrl-C or SIGTERM stop them (their
    trials are cut, for ``--resume``)."""
    from trainer.search.study import summary

    previous = signal.signal(signal.SIGTERM, _interrupt)
    seen: set[int] = set()
    interrupted = False
    try:
        while any(proc.poll() is None for proc in procs):
            _progress(study, seen)
            time.sleep(PROGRESS_S)
        while _others_running(study, root):  # workers elsewhere (--join) still train
            _progress(study, seen)
            time.sleep(PROGRESS_S)
    except KeyboardInterrupt:
        interrupted = True
        _stop(procs)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _progress(study, seen)
    result = summary(study, root)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(_summary_text(result))
    if interrupted or not result["done"]:
        print(f"panda: the study is not finished: `panda search --resume {study.study_name}` "
              "re-runs its cut trials and runs the rest", file=sys.stderr)
        return 1
    return 0


def _others_running(study, root: str) -> bool:
    """Whether trials still run once this command's workers are done: other workers' (on
    another machine, or another ``--join``), which finish, or are cut when their worker is
    gone (its process here, its heartbeat elsewhere)."""
    from optuna.trial import TrialState

    from trainer.search.study import open_storage, requeue_cut_trials

    requeue_cut_trials(study, open_storage(root, study.study_name))
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _progress(study, seen: set[int]) -> None:
    from trainer.search.study import FINISHED, outcome_of

    for trial in study.get_trials(deepcopy=False):
        if trial.state not in FINISHED or trial.number in seen:
            continue
        seen.add(trial.number)
        outcome = outcome_of(trial)
        if outcome == "surplus":
            continue
        settings = trial.user_attrs.get("settings")
        result = (f"val loss {trial.value:.4g}" if outcome == "complete"
                  else trial.user_attrs.get("reason") or outcome)
        print(f"trial {trial.number} {outcome}: {result}"
              + (f"  [{describe(settings)}]" if settings else ""), file=sys.stderr)


def _summary_text(result: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result["outcomes"].items()))
    lines = [f"study {result['study']} ({result['storage']}): {counts or 'no trials'}"]
    for record in result["rounds"][1:]:
        box = ", ".join(f"{k} [{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in record["box"].items())
        lines.append(f"round {record['round']}: {box} ({record['why']})")
    best = result["best"]
    if best is None:
        lines.append("no trial completed")
    else:
        lines.append(f"best: trial {best['trial']}, run {best['run']}: val loss "
                     f"{best['value']:.4g} at epoch {best['epoch']}"
                     + (" (settings changed by a person)" if best["manual"] else ""))
        lines.append(f"  {describe(best['settings'])}")
        lines.append(f"  export it: panda export {best['run']}")
    return "\n".join(lines)


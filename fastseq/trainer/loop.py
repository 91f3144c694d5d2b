"""The training loop: AdamW, a warm-up schedule, gradient clipping, periodic validation,
checkpoints, a step or time budget, and DistributedDataParallel under torchrun.

One step: the task's global batch for this step (a function of the seed and the step only), this
process's rows of it, the model's loss (label smoothing as asked), backward, clip the gradient
norm to 1, AdamW step, scheduler step.  Under ``torchrun --nproc_per_node N`` (RANK, WORLD_SIZE
and LOCAL_RANK set) the loss runs inside DistributedDataParallel over gloo, so the averaged
gradient -- and hence every update -- is the one a single process computes on the whole batch
(exactly when every rank's rows hold the same number of targets, as in the language models and
the dates task).  Rank 0 alone evaluates, prints and writes checkpoints; the ranks agree on
when to stop and on the schedule's length through one small all-reduce a step.

Random numbers: the weights are initialized from torch.manual_seed(--seed), the same on every
rank.  Dropout (fastseq's draws its keys from torch's default generator) is reseeded before each
step's forward from a hash of (--seed, rank, step): the ranks draw different masks, and a resumed
run draws at step n the masks the uninterrupted run draws there (it continues, not replays).

With a time budget (--minutes) and no --steps, the length of a decaying schedule (cosine,
linear) is not known in advance: it is estimated from the speed so far, first after 20 steps
and again at every validation, and the schedule is rebuilt at the current step with the new
length, so the learning rate reaches its floor when the budget runs out.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import training
from . import checkpoint as ckpt_io
from .tasks import TASKS

CALIBRATE_AT = 20                                  # steps after which a time budget's length is estimated
LOSS_WINDOW = 50                                   # the final train loss is the mean of the last steps


# ---------------------------------------------------------------------------------------------
# Schedules (fastseq.training)
# ---------------------------------------------------------------------------------------------

MIN_LR_RATIO = 0.1                                 # cosine's floor: a time budget's estimated end may come early


def make_scheduler(opt, kind: str, warmup: int, total: int):
    """fastseq.training's schedule ``kind``; the warm-up is cut to ``total`` when longer."""
    if kind == "inverse_sqrt":
        return training.inverse_sqrt_schedule(opt, max(1, warmup))
    if kind == "cosine":
        return training.cosine_schedule(opt, min(warmup, total), total, min_lr_ratio=MIN_LR_RATIO)
    if kind == "linear":
        return training.linear_schedule(opt, min(warmup, total), total)
    raise ValueError(f"--schedule must be inverse_sqrt, cosine or linear, got {kind!r}")


def scheduler_at(opt, kind: str, warmup: int, total: int, step: int):
    """A scheduler of ``total`` steps positioned at ``step`` (the optimizer's lr set for it).
    The schedules are closed-form in the step, so this also rebuilds one with a new length."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)          # "scheduler.step() before optimizer.step()"
        sched = make_scheduler(opt, kind, warmup, total)
        if step > 0:
            sched.last_epoch = step - 1
            sched.step()
    return sched


SCHEDULE_CONSTANTS = ("warmup_steps", "total_steps", "min_lr_ratio", "warmup_init_lr")   # a schedule's shape


def resumed_scheduler(opt, kind: str, warmup: int, total: int, step: int, state: Optional[Dict]):
    """The scheduler of a run resumed at ``step`` with ``total`` steps: the saved one (``state``)
    when its schedule is this run's, else (--steps changed the length) one rebuilt at ``step``
    with the new length.  The optimizer's lr is set to the scheduler's."""
    sched = scheduler_at(opt, kind, warmup, total, step)
    if state is None or any(state.get(k) != getattr(sched, k, None) for k in SCHEDULE_CONSTANTS):
        return sched
    if state.get("last_epoch") != step:
        raise ValueError(f"the checkpoint's scheduler is at step {state.get('last_epoch')!r}, its optimizer at {step}")
    sched.load_state_dict(state)
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr
    return sched


# ---------------------------------------------------------------------------------------------
# Random numbers, processes and threads
# ---------------------------------------------------------------------------------------------

def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of process ``rank``'s draws (dropout masks) at ``step``: 63 bits of a hash
    of (seed, rank, step), so ranks and steps differ and the same triple gives the same seed."""
    key = f"fastseq-train {seed} {rank} {step}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_process(threads: Optional[int], cores: int, world: int, distributed: bool) -> Optional[int]:
    """torch threads of one process: --threads when given; under torchrun, the process's share
    of the cores (at least 1); else None (torch's own default)."""
    if threads:
        return threads
    if distributed:
        return max(1, cores // world)
    return None


def init_distributed() -> tuple:
    """(rank, world size, distributed?) from torchrun's environment; gloo on 127.0.0.1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), True


class OptionError(ValueError):
    """The command line's settings make a model its config rejects (fastseq-train reports it
    through argparse: exit status 2)."""


class _Objective(nn.Module):
    """The model's loss as a forward, so that DistributedDataParallel sees the call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, label_smoothing: float, smoothing: str):
        return self.model.loss(batch, label_smoothing=label_smoothing, smoothing=smoothing)


class _Progress:
    """tqdm when installed (rank 0), otherwise a plain line every 10 seconds."""

    def __init__(self, enabled: bool, initial: int, total: Optional[int]):
        self.enabled, self.bar, self.last = enabled, None, 0.0
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                                 mininterval=1.0, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step: int, total: Optional[int], info: str):
        if not self.enabled:
            return
        if self.bar is not None:
            if total is not None and self.bar.total != total:
                self.bar.total = total
            self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(step - self.bar.n)
        elif time.time() - self.last >= 10:
            self.last = time.time()
            print(f"step {step}/{total or '?'} {info}", flush=True)

    def write(self, line: str):
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

RUN_OPTIONS = ("steps", "minutes", "eval_every", "threads", "out", "resume", "sample")   # not taken from a checkpoint


def run(args) -> Dict:
    """Train as ``args`` says; returns the summary (rank 0's; other ranks return {})."""
    rank, world, distributed = init_distributed()
    try:
        summary = _run(args, rank, world, distributed)
        if distributed:
            dist.barrier()                             # every rank done (rank 0 evaluated and saved)
        return summary
    finally:
        if distributed:
            dist.destroy_process_group()


def _run(args, rank: int, world: int, distributed: bool) -> Dict:
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    threads = threads_per_process(args.threads, available_cores(), world, distributed)
    if threads is not None:
        torch.set_num_threads(threads)

    saved = None
    path = ckpt_io.checkpoint_path(args.out)
    if args.resume:
        saved = ckpt_io.read_checkpoint(path)
        if saved["model"] != args.model:
            raise SystemExit(f"fastseq-train {args.model}: the checkpoint in {args.out} is of model {saved['model']!r}")
        for k, v in saved["args"].items():            # the run's settings are the saved ones
            if k not in RUN_OPTIONS:
                setattr(args, k, v)
    if args.batch_size % world:
        raise SystemExit(f"fastseq-train: --batch-size {args.batch_size} is not divisible by the "
                         f"{world} processes")
    if args.steps is None and args.minutes is None:
        args.minutes = args.default_minutes
    dtype = getattr(torch, args.dtype)

    task = TASKS[args.model](args, saved["tokenizer"] if saved else None)
    torch.manual_seed(args.seed)                       # the same initial weights on every rank
    if saved:
        config = saved["config"]
        model = task.model_from_config(config, vars(args)).to(dtype)
        model.load_state_dict(saved["model_state"])
    else:
        try:
            cfg = task.config(args)
            config = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
            model = task.model_from_config(config, vars(args)).to(dtype)
        except ValueError as e:                        # e.g. --dim 100 --heads 6
            raise OptionError(f"the {args.model} model rejects these options: {e}") from e
    n_params = sum(p.numel() for p in model.parameters())

    opt = torch.optim.AdamW(training.param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    step = 0
    elapsed0 = 0.0
    total = args.steps
    if saved:
        opt.load_state_dict(saved["optimizer"])
        step, elapsed0 = saved["step"], saved["elapsed"]
        total = args.steps or saved["total_steps"]
    budget = None if args.minutes is None else 60.0 * args.minutes
    estimating = args.steps is None and args.schedule != "inverse_sqrt"
    if total is None:                                   # a time budget: a first guess, refined below
        total = max(step + 1, 10 * max(1, args.warmup))
    sched = resumed_scheduler(opt, args.schedule, args.warmup, total, step, saved["scheduler"] if saved else None)

    net = _Objective(model)
    if distributed:
        net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=task.find_unused_parameters)

    say(f"fastseq-train {args.model}: {n_params:,} parameters, vocabulary {len(task.tokenizer)}, "
        f"{world} process(es) x {torch.get_num_threads()} thread(s), global batch {args.batch_size}, "
        + (f"resuming at step {step}, " if saved else "")
        + (f"{args.steps} steps" if args.steps else "") + (" or " if args.steps and budget else "")
        + (f"{args.minutes:g} minutes" if budget else ""))

    def checkpoint(metrics):
        if main:
            ckpt_io.save_checkpoint(path, {
                "model": args.model, "config": config, "model_state": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                "total_steps": total, "elapsed": elapsed, "tokenizer": task.tokenizer.state(),
                "args": {k: v for k, v in vars(args).items() if k != "func"}, "metrics": metrics})

    def evaluate(final):
        model.eval()
        m = task.evaluate(model, final=final)
        model.train()
        return m

    progress = _Progress(main, step, total if not estimating else None)
    start = time.perf_counter()
    elapsed = elapsed0
    train_time = tokens = 0.0
    first_step = step
    losses, metrics = [], {}
    model.train()
    try:
        while True:
            if args.steps is not None and step >= args.steps:
                break
            if budget is not None and elapsed >= budget:
                break
            t0 = time.perf_counter()
            batch = task.global_batch(step)
            if world > 1:
                b = args.batch_size // world
                batch = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
            torch.manual_seed(dropout_seed(args.seed, rank, step))     # this rank's dropout masks at this step
            loss = net(batch, args.label_smoothing, args.smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            train_time += time.perf_counter() - t0
            elapsed = elapsed0 + time.perf_counter() - start
            # loss (mean over ranks), rank 0's clock, tokens (sum): one all-reduce keeps the ranks agreed
            stats = torch.tensor([float(loss.detach()) / world, elapsed if main else 0.0, task.tokens(batch)],
                                 dtype=torch.float64)
            if distributed:
                dist.all_reduce(stats)
            step_loss, elapsed, step_tokens = stats.tolist()
            tokens += step_tokens
            losses = (losses + [step_loss])[-LOSS_WINDOW:]
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"fastseq-train {args.model}: the loss is {step_loss} at step {step}")

            do_eval = step % args.eval_every == 0
            if estimating and budget is not None and (step - first_step == CALIBRATE_AT or do_eval):
                rate = (elapsed - elapsed0) / (step - first_step)            # seconds a step, evaluations included
                new_total = max(step + 1, step + int((budget - elapsed) / rate))
                if new_total != total:
                    total = new_total
                    sched = scheduler_at(opt, args.schedule, args.warmup, total, step)
            progress.update(step, total if (args.steps or estimating) else None,
                            f"loss {step_loss:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                            f"{tokens / train_time:,.0f} tok/s")
            if do_eval:
                if main:
                    metrics = evaluate(final=False)
                    progress.write(f"step {step}: train loss {sum(losses) / len(losses):.4f}, "
                                   + task.describe(metrics))
                    checkpoint(metrics)
    except KeyboardInterrupt:
        if distributed:
            raise
        progress.write("interrupted: evaluating and saving the checkpoint")
    progress.close()

    summary = {}
    if main:
        metrics = evaluate(final=True)
        checkpoint(metrics)
        train_loss = sum(losses) / len(losses) if losses else float("nan")
        summary = {"model": args.model, "parameters": n_params, "steps": step, "tokens": tokens,
                   "seconds": elapsed, "tokens_per_s": tokens / train_time if train_time else 0.0,
                   "train_loss": train_loss, **metrics, "unit": task.unit, "processes": world,
                   "threads": torch.get_num_threads(), "checkpoint": path}
        if args.sample:
            model.eval()
            text = task.sample(model)
            if text:
                say("sample:\n" + text)
        variant = getattr(args, "arch", None) or getattr(args, "cell", None)
        say(f"fastseq-train {args.model}" + (f" ({variant})" if variant else "")
            + f": {n_params:,} parameters, {step} steps, {elapsed:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s, "
            f"final train loss {train_loss:.4f}" + (", " + task.describe(metrics) if metrics else ""))
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary

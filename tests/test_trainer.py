"""fastseq-train (fastseq/trainer): tokenizers, the dates task, every subcommand end to end with a
checkpoint that round-trips and resumes (dropout included), the time budget, per-rank dropout
seeds and thread shares, and DDP (2 processes under torchrun on 127.0.0.1) ending with the
parameters of one process trained on the whole batch."""
import copy
import datetime
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

import fastseq.functional as FF
from fastseq.trainer import checkpoint as ckpt_io
from fastseq.trainer import loop
from fastseq.trainer.__main__ import main
from fastseq.trainer.data import (ByteTokenizer, CharTokenizer, SPECIALS, python_help_text, split_text,
                                  tokenizer_from_state)
from fastseq.trainer.dates import CASES, FORMATS, make_dates, ordinal, write_date
from fastseq.trainer.loop import dropout_seed, resumed_scheduler, scheduler_at, threads_per_process
from fastseq.trainer.tasks import ModelUnavailable, import_model

TINY = ["--dim", "16", "--layers", "1", "--batch-size", "4", "--threads", "1", "--eval-every", "2", "--no-sample"]
TEXT = ["--seq-len", "12"]
MODELS = {                                        # subcommand arguments of a tiny model
    "gpt": ["gpt", *TEXT, "--heads", "2"],
    "bert": ["bert", *TEXT, "--heads", "2"],
    "elmo": ["elmo", *TEXT, "--hidden", "24"],
    "rnnlm": ["rnnlm", *TEXT],
    "rnnlm-layer_norm_gru": ["rnnlm", *TEXT, "--cell", "layer_norm_gru"],
    "seq2seq-transformer": ["seq2seq", "--heads", "2", "--ffn-dim", "32", "--train-size", "300",
                            "--heldout-size", "40"],
    "seq2seq-lstm": ["seq2seq", "--arch", "lstm", "--hidden", "24", "--train-size", "300", "--heldout-size", "40"],
}


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """The first 30,000 characters of Python's help text (validation: the last 3,000)."""
    path = tmp_path_factory.mktemp("data") / "help.txt"
    path.write_text(python_help_text()[:30000], encoding="utf-8")
    return str(path)


def _args(name, small_text, out, *extra):
    a = list(MODELS[name]) + TINY + ["--out", str(out), *extra]
    return a + (["--data", small_text] if a[0] != "seq2seq" else [])


def _summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ tokenizers and text

def test_python_help_text_and_split():
    text = python_help_text()
    assert 400_000 < len(text) < 600_000 and "The " in text
    train, val = split_text(text)
    assert train + val == text and len(val) == len(text) - int(len(text) * 0.9)


def test_byte_tokenizer_round_trips_any_text():
    t = ByteTokenizer()
    text = "naïve café — 東京 \n\t\x00 ok"
    ids = t.encode(text)
    assert max(ids) < 256 and t.decode(ids) == text
    assert len(t) == 256 + len(SPECIALS) and t.special_ids == tuple(range(256, 256 + len(SPECIALS)))
    assert t.decode(ids + [t.eos_id, t.pad_id]) == text                       # specials dropped
    assert isinstance(tokenizer_from_state(t.state()), ByteTokenizer)


def test_char_tokenizer_round_trips_deterministic_ids_and_unknown():
    text = python_help_text()[:20000]
    t = CharTokenizer.from_text(text)
    assert t.decode(t.encode(text)) == text
    assert t.encode(text[:200]) == CharTokenizer.from_text(text[::-1]).encode(text[:200])   # order-independent ids
    assert (t.pad_id, t.unk_id, t.bos_id, t.eos_id, t.mask_id) == (0, 1, 2, 3, 4)
    assert min(t.encode(text)) >= len(SPECIALS) and len(t) == len(SPECIALS) + len(set(text))
    assert t.encode("\u2603a") == [t.unk_id, t.encode("a")[0]]                 # a snowman never seen
    t2 = tokenizer_from_state(t.state())
    assert t2.encode(text) == t.encode(text)
    with pytest.raises(ValueError, match="twice"):
        CharTokenizer("aa")


# ------------------------------------------------------------------------------ the dates task

# strptime patterns (an independent reader) after ordinals lose their suffix
PATTERNS = ["%d %B %Y", "%B %d, %Y", "%d/%m/%Y (day first)", "%m/%d/%Y (month first)", "%Y-%m-%d",
            "%a %d %b %Y", "%d of %B %Y", "the %d of %B, %Y", "%A, %B %d, %Y", "%b %d %Y", "%d %b %Y",
            "%d.%m.%Y", "%Y/%m/%d", "%Y%m%d"]


def _read(src):
    """Every date the patterns read from src, and the patterns that read one."""
    s = re.sub(r"\b(\d+)(st|nd|rd|th)\b", r"\1", src, flags=re.IGNORECASE)
    out = {}
    for p in PATTERNS:
        try:
            out[p] = datetime.datetime.strptime(s, p).date()
        except ValueError:
            pass
    return out


def test_write_date_examples():
    d = datetime.date(1987, 3, 3)
    written = {name: write_date(d, i, 0) for i, (name, _) in enumerate(FORMATS)}
    assert all(name == text for name, text in written.items())               # each format's name is its example
    assert write_date(d, 5, 1) == "tue 3 mar 1987" and write_date(d, 9, 2) == "TUESDAY, MARCH 3, 1987"
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]


def test_dates_targets_are_right_formats_varied_sets_disjoint_and_deterministic():
    train, held = make_dates(3000, 500, seed=0)
    assert (train, held) == make_dates(3000, 500, seed=0)
    assert train != make_dates(3000, 500, seed=1)[0]
    assert {t for _, t in train}.isdisjoint({t for _, t in held})              # no held-out date is trained on
    assert {s for s, _ in train}.isdisjoint({s for s, _ in held})
    seen_patterns = set()
    for src, tgt in train[:1500] + held[:300]:
        d = datetime.date.fromisoformat(tgt)
        assert tgt == d.isoformat() and datetime.date(1900, 1, 1) <= d <= datetime.date(2099, 12, 31)
        read = _read(src)
        assert read and set(read.values()) == {d}, (src, tgt, read)             # every reading agrees with the target
        seen_patterns |= set(read)
        if re.match(r"^(mon|tue|wed|thu|fri|sat|sun)", src, re.IGNORECASE):
            assert src[:3].lower() == d.strftime("%a").lower()                   # the weekday is the date's
    assert seen_patterns == set(PATTERNS)                                        # every format occurs
    assert any(s.islower() for s, _ in train) and any(s.isupper() for s, _ in train)
    assert len(CASES) == 3
    with pytest.raises(ValueError, match="train_size"):
        make_dates(0, 10)


# ------------------------------------------------------------------------------ schedules, errors

def test_scheduler_at_equals_stepping():
    for kind in ("cosine", "linear", "inverse_sqrt"):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1.0)
        sched = scheduler_at(opt, kind, 4, 20, 0)
        for _ in range(7):
            opt.step()
            sched.step()
        lr = opt.param_groups[0]["lr"]
        opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler_at(opt2, kind, 4, 20, 7)
        assert opt2.param_groups[0]["lr"] == pytest.approx(lr) and lr > 0


def test_resumed_scheduler_loads_the_saved_one_or_rebuilds_a_new_length():
    for kind in ("cosine", "linear", "inverse_sqrt"):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = scheduler_at(opt, kind, 4, 20, 0)
        for _ in range(7):
            opt.step()
            sched.step()
        state, opt_state = sched.state_dict(), opt.state_dict()

        def resumed_opt():
            o = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            o.load_state_dict(opt_state)
            return o
        opt2 = resumed_opt()
        sched2 = resumed_scheduler(opt2, kind, 4, 20, 7, state)                  # the same length: loaded
        assert sched2.state_dict() == state                                      # (step counts included)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] > 0
        opt3 = resumed_opt()
        sched3 = resumed_scheduler(opt3, kind, 4, 30, 7, state)                  # a new length: rebuilt
        opt4 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler_at(opt4, kind, 4, 30, 7)
        assert sched3.last_epoch == 7 and opt3.param_groups[0]["lr"] == pytest.approx(opt4.param_groups[0]["lr"])
        if kind != "inverse_sqrt":
            assert sched3.total_steps == 30
        with pytest.raises(ValueError, match="step 7"):                          # scheduler and optimizer disagree
            resumed_scheduler(resumed_opt(), kind, 4, 20, 6, state)


def test_dropout_seed_differs_across_ranks_and_steps_and_repeats():
    """Each (seed, rank, step) its own seed, the same every time; it drives fastseq's dropout."""
    s = dropout_seed(0, 0, 5)
    assert s == dropout_seed(0, 0, 5) and 0 <= s < 2 ** 63
    seeds = {dropout_seed(seed, rank, step) for seed in (0, 1) for rank in (0, 1, 2) for step in range(50)}
    assert len(seeds) == 2 * 3 * 50
    x = torch.ones(256, dtype=torch.float64)

    def mask(seed, rank, step):
        torch.manual_seed(dropout_seed(seed, rank, step))
        return FF.dropout(x, 0.5, True)
    assert torch.equal(mask(0, 0, 3), mask(0, 0, 3))
    assert not torch.equal(mask(0, 0, 3), mask(0, 1, 3))                         # ranks differ
    assert not torch.equal(mask(0, 0, 3), mask(0, 0, 4))                         # steps differ


def test_threads_per_process():
    """--threads wins; under torchrun each process gets cores // processes (at least 1);
    a plain run keeps torch's default (None)."""
    assert threads_per_process(None, 16, 2, True) == 8
    assert threads_per_process(None, 2, 2, True) == 1
    assert threads_per_process(None, 16, 1, True) == 16
    assert threads_per_process(None, 2, 1, True) == 2
    assert threads_per_process(None, 1, 2, True) == 1
    assert threads_per_process(None, 16, 3, True) == 5
    assert threads_per_process(None, 16, 1, False) is None
    assert threads_per_process(3, 16, 2, True) == 3 and threads_per_process(3, 2, 1, False) == 3


def _exits_with_usage(capsys, argv, *words):
    """main(argv) ends through argparse's error: exit status 2, usage, a message with ``words``."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: fastseq-train" in err and "error:" in err, err
    assert all(w in err for w in words), err


def test_bad_options_and_missing_models_fail_clearly(tmp_path, small_text, capsys):
    _exits_with_usage(capsys, _args("gpt", small_text, tmp_path, "--dropout", "1.5", "--steps", "1"), "--dropout")
    _exits_with_usage(capsys, _args("gpt", small_text, tmp_path, "--batch-size", "0", "--steps", "1"),
                      "--batch-size")
    _exits_with_usage(capsys, _args("gpt", small_text, tmp_path, "--weight-decay", "-0.1", "--steps", "1"),
                      "--weight-decay", "-0.1")
    # options the model's config rejects: no traceback, the config's message
    _exits_with_usage(capsys, _args("gpt", small_text, tmp_path, "--dim", "100", "--heads", "6", "--steps", "1"),
                      "dim (100)", "heads (6)")
    assert not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(ModelUnavailable, match="fastseq.models.no_such_model"):
        import_model("no_such_model", "Config")
    with pytest.raises(FileNotFoundError):
        main(_args("gpt", small_text, tmp_path / "nothing", "--steps", "1", "--resume"))


# ------------------------------------------------------------------------------ every subcommand

@pytest.mark.parametrize("name", list(MODELS))
def test_subcommand_trains_checkpoints_and_resumes(name, tmp_path, small_text):
    out = tmp_path / "run"
    assert main(_args(name, small_text, out, "--steps", "3")) == 0
    s = _summary(out)
    assert s["steps"] == 3 and s["parameters"] > 0 and math.isfinite(s["val_loss"]) and s["tokens_per_s"] > 0
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "summary.json"]          # no temporary file left
    ck = ckpt_io.read_checkpoint(str(out))
    assert ck["step"] == 3 and ck["model"] == MODELS[name][0]
    assert {"model_state", "config", "optimizer", "scheduler", "tokenizer", "args", "metrics"} <= set(ck)
    model, tok, _ = ckpt_io.load_model(str(out))                                 # the config rebuilds the model
    assert not model.training and len(tok) == ck["config"]["vocab_size"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["model_state"][k]), k
    if name.startswith("seq2seq"):
        assert 0.0 <= s["exact_match"] <= 1.0 and s["heldout"] == 40
    assert main(_args(name, small_text, out, "--steps", "5", "--resume")) == 0
    assert _summary(out)["steps"] == 5 and ckpt_io.read_checkpoint(str(out))["step"] == 5


def test_resume_continues_the_same_run(tmp_path, small_text, monkeypatch):
    """4 steps in one go == 2 steps, then --resume to 4 (dropout 0.1: the batches, the dropout
    masks, the optimizer state and the schedule position all carry over); also == the
    uninterrupted run's own step-2 checkpoint resumed (the same schedule length: the saved
    scheduler is loaded)."""
    kw = ("--dropout", "0.1", "--warmup", "2", "--dtype", "float64")
    written = {}
    save = ckpt_io.save_checkpoint

    def keep_a_copy(path, ck):
        written[ck["step"]] = copy.deepcopy(ck)
        save(path, ck)
    monkeypatch.setattr(ckpt_io, "save_checkpoint", keep_a_copy)
    main(_args("gpt", small_text, tmp_path / "a", "--steps", "4", *kw))           # checkpoints at steps 2 and 4
    monkeypatch.setattr(ckpt_io, "save_checkpoint", save)
    interrupted = written[2]
    assert interrupted["total_steps"] == 4 and interrupted["scheduler"]["total_steps"] == 4
    save(ckpt_io.checkpoint_path(str(tmp_path / "c")), interrupted)
    main(_args("gpt", small_text, tmp_path / "c", "--steps", "4", "--resume"))
    main(_args("gpt", small_text, tmp_path / "b", "--steps", "2", *kw))
    main(_args("gpt", small_text, tmp_path / "b", "--steps", "4", "--resume"))
    a = ckpt_io.read_checkpoint(str(tmp_path / "a"))
    b = ckpt_io.read_checkpoint(str(tmp_path / "b"))
    c = ckpt_io.read_checkpoint(str(tmp_path / "c"))
    assert b["step"] == c["step"] == 4 and b["args"]["dtype"] == "float64" and b["args"]["dropout"] == 0.1
    for k, v in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][k], v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c["model_state"][k], v, rtol=1e-12, atol=1e-12)
    assert c["scheduler"] == a["scheduler"] and b["scheduler"]["last_epoch"] == 4
    model, _, _ = ckpt_io.load_model(str(tmp_path / "b"))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    torch.testing.assert_close(model.state_dict(), b["model_state"], rtol=0, atol=0)


class _SteadyClock:
    """loop's clock, advancing a fixed time at every reading: a machine of perfectly steady speed
    (every step reads it the same number of times), whatever else runs on this one."""

    def __init__(self, tick: float):
        self.tick, self.readings = tick, 0

    def perf_counter(self):
        self.readings += 1
        return self.readings * self.tick

    time = staticmethod(time.time)


def test_time_budget_stops_the_run_and_sizes_the_schedule(tmp_path, small_text, monkeypatch):
    """--minutes without --steps: the run stops at the budget (on the real clock, and on a
    steady one: at the first step past it), and the cosine schedule's length, estimated from the
    speed, is the steps actually taken, so the lr ends on its floor."""
    budget_args = ("--minutes", "0.02", "--eval-every", "25", "--warmup", "5")          # 1.2 s
    main(_args("rnnlm", small_text, tmp_path / "real", *budget_args))
    s = _summary(tmp_path / "real")
    assert s["steps"] > 0 and 1.2 <= s["seconds"] < 30                          # stopped by the budget
    monkeypatch.setattr(loop, "time", _SteadyClock(0.0097))
    main(_args("rnnlm", small_text, tmp_path / "steady", *budget_args))
    s = _summary(tmp_path / "steady")
    steps, per_step = s["steps"], s["seconds"] / s["steps"]
    assert steps > loop.CALIBRATE_AT and s["seconds"] >= 1.2 > s["seconds"] - per_step   # the first step past it
    ck = ckpt_io.read_checkpoint(str(tmp_path / "steady"))
    assert ck["total_steps"] != 10 * 5                                           # the first guess was re-estimated
    assert abs(ck["total_steps"] - steps) <= 1, (ck["total_steps"], steps)
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(ck["args"]["lr"] * loop.MIN_LR_RATIO)


@pytest.mark.parametrize("name", ["gpt", "bert", "elmo", "rnnlm"])
def test_training_lowers_the_validation_loss(name, tmp_path, capsys):
    """On the default corpus (all of Python's help text): 40 steps take a tiny model's validation
    loss (nats per predicted character; BERT's at the masked positions) down by a nat or more."""
    tiny = list(MODELS[name]) + TINY + ["--dim", "32", "--warmup", "5", "--eval-every", "100"]
    tiny += ["--hidden", "64"] if name == "elmo" else []
    main(tiny + ["--out", str(tmp_path / "a"), "--steps", "1", "--lr", "1e-9"])
    before = _summary(tmp_path / "a")["val_loss"]
    main(tiny + ["--out", str(tmp_path / "b"), "--steps", "40", "--lr", "1e-2", "--sample"])
    after = _summary(tmp_path / "b")
    assert before > 4.0 and after["val_loss"] < before - 1.0, (before, after)
    out = capsys.readouterr().out
    assert f"fastseq-train {name}: " in out and "tokens/s" in out
    if name == "gpt":
        assert "sample:\nThe " in out


# ------------------------------------------------------------------------------ DDP

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path, small_text):
    """torchrun --nproc_per_node 2 (gloo, 127.0.0.1), each rank on half of a global batch of 4,
    ends with the parameters of one process on the whole batch (fp64, dropout 0)."""
    kw = ("--steps", "3", "--dropout", "0", "--warmup", "0", "--dtype", "float64")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "fastseq.trainer", *_args("gpt", small_text, tmp_path / "ddp", *kw)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("fastseq-train gpt: ") == 2                          # rank 0 alone prints (start + summary)
    assert "2 process(es)" in r.stdout
    main(_args("gpt", small_text, tmp_path / "one", *kw))
    ddp = ckpt_io.read_checkpoint(str(tmp_path / "ddp"))
    one = ckpt_io.read_checkpoint(str(tmp_path / "one"))
    assert ddp["step"] == one["step"] == 3
    # the two ranks shared the rows out (each on its half: the same token count as one process)
    assert _summary(tmp_path / "ddp")["tokens"] == _summary(tmp_path / "one")["tokens"] == 3 * 4 * 12
    worst = 0.0
    for k, v in one["model_state"].items():
        torch.testing.assert_close(ddp["model_state"][k], v, rtol=1e-10, atol=1e-12)
        assert v.dtype == torch.float64
        worst = max(worst, float((ddp["model_state"][k] - v).abs().max()))
    print(f"largest |DDP - one process| parameter difference: {worst:.2e}")
    # the comparison can tell batches apart: half the batch ends elsewhere
    main(_args("gpt", small_text, tmp_path / "half", *kw, "--batch-size", "2"))
    half = ckpt_io.read_checkpoint(str(tmp_path / "half"))["model_state"]
    assert any(not torch.allclose(half[k], v, rtol=1e-6, atol=1e-9) for k, v in one["model_state"].items())

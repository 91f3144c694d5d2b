"""fastseq.training: the warm-up schedules against their formulas, their state_dicts, a real
optimizer loop; param_groups; the label-smoothing conventions."""
import io
import math

import pytest
import torch

import fastseq.functional as FF
from fastseq.training import (cosine_schedule, inverse_sqrt_schedule, linear_schedule, param_groups,
                              smoothing_conventions)

LRS = (1e-3, 3e-4)                       # two param groups with their own peak lr


def _optimizer(kind="adamw"):
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    groups = [{"params": [a], "lr": LRS[0]}, {"params": [b], "lr": LRS[1]}]
    return {"adamw": lambda: torch.optim.AdamW(groups), "sgd": lambda: torch.optim.SGD(groups, momentum=0.9),
            "adagrad": lambda: torch.optim.Adagrad(groups)}[kind]()


def _lrs(scheduler, opt, steps):
    """The groups' lr before each of `steps` updates (index n = after n scheduler steps)."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    return out


# independent statements of the formulas

def fairseq_inverse_sqrt(lr, warmup_init_lr, warmup_updates, num_updates):
    """fairseq's InverseSquareRootSchedule.step_update, restated."""
    lr_step = (lr - warmup_init_lr) / warmup_updates
    decay_factor = lr * warmup_updates ** 0.5
    if num_updates < warmup_updates:
        return warmup_init_lr + num_updates * lr_step
    return decay_factor * num_updates ** -0.5


def hf_linear(lr, warmup, total, step):
    """Hugging Face's get_linear_schedule_with_warmup lambda, restated."""
    if step < warmup:
        return lr * float(step) / float(max(1, warmup))
    return lr * max(0.0, float(total - step) / float(max(1, total - warmup)))


def cosine(lr, warmup, total, m, step):
    if step < warmup:
        return lr * step / warmup
    p = min(1.0, (step - warmup) / (total - warmup))
    return lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adagrad"])
@pytest.mark.parametrize("warmup, init", [(10, 0.0), (10, 1e-7), (1, 0.0), (25, 5e-4)])
def test_inverse_sqrt_is_fairseqs_formula(kind, warmup, init):
    opt = _optimizer(kind)
    s = inverse_sqrt_schedule(opt, warmup, warmup_init_lr=init)
    got = _lrs(s, opt, 120)
    for n, lrs in enumerate(got):
        for lr, peak in zip(lrs, LRS):
            assert lr == pytest.approx(fairseq_inverse_sqrt(peak, init, warmup, n), rel=1e-12, abs=1e-18), n
    assert got[0] == [init, init]                                   # step 0: the initial lr
    assert got[warmup] == pytest.approx(list(LRS), rel=1e-12)       # the peak at the end of warm-up
    assert got[4 * warmup] == pytest.approx([lr / 2 for lr in LRS], rel=1e-12)   # 1/sqrt: half at 4x
    if warmup > 1:
        assert got[warmup - 1][0] < got[warmup][0] > got[warmup + 1][0]


@pytest.mark.parametrize("warmup, total", [(10, 50), (0, 30), (30, 30), (1, 2)])
def test_linear_is_hugging_faces_schedule(warmup, total):
    opt = _optimizer()
    got = _lrs(linear_schedule(opt, warmup, total), opt, total + 10)
    for n, lrs in enumerate(got):
        for lr, peak in zip(lrs, LRS):
            assert lr == pytest.approx(hf_linear(peak, warmup, total, n), rel=1e-12, abs=1e-18), n
    assert got[0] == ([0.0, 0.0] if warmup else list(LRS))
    assert got[warmup] == pytest.approx(list(LRS), rel=1e-12) or warmup == total
    assert got[total] == [0.0, 0.0] and got[-1] == [0.0, 0.0]       # 0 at the end and after


@pytest.mark.parametrize("warmup, total, m", [(10, 60, 0.0), (10, 60, 0.1), (0, 40, 0.0), (5, 6, 0.5)])
def test_cosine_is_warmup_then_half_cosine_to_the_floor(warmup, total, m):
    opt = _optimizer()
    got = _lrs(cosine_schedule(opt, warmup, total, min_lr_ratio=m), opt, total + 10)
    for n, lrs in enumerate(got):
        for lr, peak in zip(lrs, LRS):
            assert lr == pytest.approx(cosine(peak, warmup, total, m, n), rel=1e-12, abs=1e-18), n
    assert got[warmup] == pytest.approx(list(LRS), rel=1e-12)
    mid = warmup + (total - warmup) // 2
    if (total - warmup) % 2 == 0:
        assert got[mid] == pytest.approx([lr * (1 + m) / 2 for lr in LRS], rel=1e-12)
    assert got[total] == pytest.approx([m * lr for lr in LRS], abs=1e-18)
    assert got[-1] == got[total]                                    # stays at the floor


@pytest.mark.parametrize("make", [lambda o: inverse_sqrt_schedule(o, 7, 1e-6),
                                  lambda o: cosine_schedule(o, 5, 40, 0.1),
                                  lambda o: linear_schedule(o, 5, 40)])
def test_state_dict_round_trips_through_a_checkpoint(make):
    torch.manual_seed(0)
    opt = _optimizer()
    s = make(opt)
    straight = _lrs(s, opt, 30)
    opt = _optimizer()
    s = make(opt)
    first = _lrs(s, opt, 12)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": s.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    opt2 = _optimizer()
    s2 = make(opt2)                                   # torch's order: the scheduler, then the optimizer's state
    opt2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["sched"])
    assert s2.last_epoch == 12 and s2.get_last_lr() == s.get_last_lr()
    assert first + _lrs(s2, opt2, 18) == straight


def test_a_real_training_loop_follows_the_schedule_and_learns():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 16), torch.nn.Linear(16, 32), torch.nn.GELU(),
                                torch.nn.LayerNorm(32), torch.nn.Linear(32, 20))
    x = torch.randint(20, (64,))
    y = (x * 7 + 3) % 20
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
    sched = linear_schedule(opt, 5, 40)
    losses = []
    for n in range(40):
        assert opt.param_groups[0]["lr"] == pytest.approx(hf_linear(1e-2, 5, 40, n), rel=1e-12, abs=1e-18)
        assert opt.param_groups[1]["weight_decay"] == 0.0
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert opt.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda o: inverse_sqrt_schedule(o, 0), "warmup_steps.*0"),
    (lambda o: inverse_sqrt_schedule(o, 2.5), "warmup_steps.*2.5"),
    (lambda o: inverse_sqrt_schedule(o, 10, warmup_init_lr=-1.0), "warmup_init_lr.*-1.0"),
    (lambda o: linear_schedule(o, -1, 10), "warmup_steps.*-1"),
    (lambda o: linear_schedule(o, 20, 10), "total_steps=10, warmup_steps=20"),
    (lambda o: linear_schedule(o, 0, 0), "total_steps.*0"),
    (lambda o: cosine_schedule(o, 5, True), "total_steps.*True"),
    (lambda o: cosine_schedule(o, 5, 10, min_lr_ratio=1.5), "min_lr_ratio.*1.5"),
])
def test_bad_schedule_arguments_raise_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call(_optimizer())


def test_param_groups_splits_the_gpt2_bert_way():
    from fastseq.models.bert import BERT, BERTConfig
    m = BERT(BERTConfig(vocab_size=50, max_positions=16, dim=16, layers=1, heads=2))
    m.embeddings.position.weight.requires_grad_(False)
    groups = param_groups(m, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay == {"embeddings.token.weight", "embeddings.segment.weight", "layers.0.self_attn.in_proj_weight",
                     "layers.0.self_attn.out_proj.weight", "layers.0.linear1.weight", "layers.0.linear2.weight",
                     "head.dense.weight"}
    assert {"layers.0.norm1.weight", "embeddings.norm.weight", "head.bias", "layers.0.linear1.bias",
            "layers.0.self_attn.in_proj_bias"} <= no_decay
    assert all(not n.endswith("weight") or "norm" in n for n in no_decay)
    assert len(decay) + len(no_decay) == sum(1 for p in m.parameters() if p.requires_grad)
    tied = torch.nn.Linear(4, 4)
    shared = torch.nn.Sequential(tied, tied)
    assert [len(g["params"]) for g in param_groups(shared, 0.1)] == [1, 1]   # a shared parameter once
    with pytest.raises(ValueError, match="weight_decay.*-0.1"):
        param_groups(m, -0.1)


@pytest.mark.parametrize("smoothing", ["torch", "fairseq"])
def test_smoothing_conventions_are_the_distributions_cross_entropy_uses(smoothing):
    eps, V = 0.1, 7
    conv = smoothing_conventions(eps, V)
    target_p, other_p = conv[smoothing]
    assert target_p + (V - 1) * other_p == pytest.approx(1.0, rel=1e-14)
    z = torch.randn(5, V, dtype=torch.float64)
    t = torch.randint(V, (5,))
    q = torch.full((5, V), other_p, dtype=torch.float64)
    q[torch.arange(5), t] = target_p
    soft = -(q * torch.log_softmax(z, -1)).sum(-1).mean()                # cross-entropy with that distribution
    torch.testing.assert_close(FF.cross_entropy(z, t, label_smoothing=eps, smoothing=smoothing), soft,
                               rtol=1e-12, atol=0)
    if smoothing == "torch":
        torch.testing.assert_close(torch.nn.functional.cross_entropy(z, t, label_smoothing=eps), soft,
                                   rtol=1e-12, atol=0)
    assert conv["torch"] != conv["fairseq"]
    assert smoothing_conventions(0.0, V)["torch"] == smoothing_conventions(0.0, V)["fairseq"] == (1.0, 0.0)

"""Helpers shared by the model test files (tests/test_models_*.py): the fastseq model and its torch.nn
twin with the same weights, their loss and gradients, and the checks DESIGN.md §6 asks of every model."""
import torch


def build_pair(model_cls, twin_cls, config, dtype=torch.float32, perturb=None):
    """The fastseq model and its twin with the same weights, loaded strictly (the same keys and shapes).
    perturb: the scale of Gaussian noise added to every parameter of the model first (so norms, biases
    and padding rows are off their initial values); None adds nothing and draws no random numbers."""
    fast = model_cls(config).to(dtype)
    if perturb is not None:
        with torch.no_grad():
            for p in fast.parameters():
                p.add_(perturb * torch.randn_like(p))
    twin = twin_cls(config).to(dtype)
    twin.load_state_dict(fast.state_dict())
    return fast, twin


def loss_and_grads(net, batch, **kw):
    """(loss, {parameter name: gradient}) of net.loss(batch, **kw), detached."""
    net.zero_grad(set_to_none=True)
    loss = net.loss(batch, **kw)
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in net.named_parameters()}


def assert_grads_match(a, b, rtol, atol):
    """Two {name: gradient} dicts have the same names and close gradients."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def assert_loss_and_grads_match(fast, twin, batch, rtol=1e-9, atol=1e-12, **kw):
    """fast and twin give the same loss (rtol 1e-12) and every gradient (rtol, atol) on batch; returns
    the twin's gradients."""
    lf, gf = loss_and_grads(fast, batch, **kw)
    lt, gt = loss_and_grads(twin, batch, **kw)
    torch.testing.assert_close(lf, lt, rtol=1e-12, atol=0)
    assert_grads_match(gf, gt, rtol, atol)
    return gt


def assert_fp32_within(fast32, twin32, ref64, factor=4, slack=1e-6, twin_error="each", loss_slack=None):
    """The fastseq model's fp32 error is within factor x its twin's fp32 error. fast32, twin32, ref64:
    the (loss, grads) of the model in fp32, of the twin in fp32 and of the twin in fp64 (the reference),
    on the same weights and batch. The loss: |error| <= factor x |twin's error| + loss_slack (default
    slack). Each gradient, with twin_error
      "each":  max |error| <= factor x the twin's max |error| on that gradient + slack x its largest element;
      "worst": its relative error (max |error| / its largest element) <= factor x the twin's worst relative
               error over all gradients + slack (rounding noise propagates through the whole chain, so
               one tensor's error alone can be luckily small)."""
    (lf, gf), (lt, gt), (lr, gr) = fast32, twin32, ref64
    loss_slack = slack if loss_slack is None else loss_slack
    assert abs(lf.double() - lr) <= factor * abs(lt.double() - lr) + loss_slack, (lf, lt, lr)
    err = lambda g, k: (g[k].double() - gr[k]).abs().max().item()
    scale = lambda k: gr[k].abs().max().item()
    if twin_error == "each":
        for k in gr:
            assert err(gf, k) <= factor * err(gt, k) + slack * scale(k), (k, err(gf, k), err(gt, k))
    elif twin_error == "worst":
        rel = lambda g, k: err(g, k) / max(scale(k), 1e-30)
        torch_rel = max(rel(gt, k) for k in gr)
        for k in gr:
            assert rel(gf, k) <= factor * torch_rel + slack, (k, rel(gf, k), rel(gt, k), torch_rel)
    else:
        raise ValueError(f"twin_error must be 'each' or 'worst', got {twin_error!r}")


def assert_dropout_reproducible(model, batch):
    """In training the loss with dropout is the same from the same seed, differs from another seed's,
    and differs from the loss in eval mode (the model is left in eval mode)."""
    torch.manual_seed(5)
    l1 = model.loss(batch)
    torch.manual_seed(5)
    l2 = model.loss(batch)
    torch.manual_seed(6)
    l3 = model.loss(batch)
    assert l1.item() == l2.item()
    assert l1.item() != l3.item()
    assert l1.item() != model.eval().loss(batch).item()


def train_steps(model, batch, lr, steps=30, **kw):
    """`steps` AdamW steps (learning rate lr) on one fixed batch; the losses before each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(batch, **kw)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_example_batch_does_not_share_storage(batch):
    """batch["tokens"] and batch["targets"] are separate tensors: writing one leaves the other."""
    assert batch["tokens"].untyped_storage().data_ptr() != batch["targets"].untyped_storage().data_ptr()
    tokens = batch["tokens"].clone()
    batch["targets"].fill_(-100)
    assert torch.equal(batch["tokens"], tokens)

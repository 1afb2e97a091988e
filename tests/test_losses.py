"""losses.py against brute-force loops over the paper's equations, the masking guarantees and 2-rank DDP equivalence."""
import math
import re
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import centroid_loss, lava_loss, nce

FORMS = ("symmetric", "paper_eq1")


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def random_mask(B, seed, p=0.6, min_valid=2):
    g = torch.Generator().manual_seed(seed)
    while True:
        m = torch.rand(B, generator=g) < p
        if m.sum() >= min_valid:
            return m


# ----------------------------------------------------------------------------------------------------------------
# brute force: plain python loops over the equations in the docstrings (math.exp on python floats)


def brute_nce(x, y, mask, tau, form):
    idx = [i for i in range(len(x)) if mask[i]]
    if len(idx) < 2:
        return 0.0
    s = {(i, j): float(x[i] @ y[j]) / tau for i in idx for j in idx}
    if form == "symmetric":
        total = 0.0
        for i in idx:
            total -= math.log(math.exp(s[i, i]) / sum(math.exp(s[i, j]) for j in idx))   # x_i vs all y_j
            total -= math.log(math.exp(s[i, i]) / sum(math.exp(s[j, i]) for j in idx))   # y_i vs all x_j
        return total / (2 * len(idx))
    pos = sum(math.exp(s[i, i]) for i in idx)
    neg = sum(math.exp(s[i, j]) for i in idx for j in idx if j != i)
    return -math.log(pos / (pos + neg))


def brute_centroid(z, present, tau, form, normalize=False):
    B = len(present["a"])
    c = torch.zeros_like(z["a"])
    for i in range(B):
        have = [m for m in "avt" if present[m][i]]
        if have:
            c[i] = sum(z[m][i] for m in have) / len(have)
            if normalize:
                c[i] = c[i] / c[i].norm()
    return sum(brute_nce(z[m], c, present[m], tau, form) for m in "avt")


@pytest.mark.parametrize("form", FORMS)
def test_nce_matches_brute_force(form):
    for seed in range(4):
        x, y = unit(7, 5, seed=seed), unit(7, 5, seed=seed + 100)
        for mask in (torch.ones(7, dtype=torch.bool), random_mask(7, seed)):
            for tau in (0.07, 0.5):
                got = nce(x, y, mask, tau, form).item()
                assert got == pytest.approx(brute_nce(x, y, mask, tau, form), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("normalize", (False, True))
def test_centroid_matches_brute_force(form, normalize):
    for seed in range(3):
        z = {m: unit(8, 6, seed=seed * 10 + k) for k, m in enumerate("avt")}
        present = {m: random_mask(8, seed * 10 + k + 50, p=0.7) for k, m in enumerate("avt")}
        present["v"][:] = True
        got = centroid_loss(z, present, 0.07, normalize_centroid=normalize, form=form).item()
        assert got == pytest.approx(brute_centroid(z, present, 0.07, form, normalize), rel=1e-10)


def test_lava_loss_is_the_sum_of_its_terms():
    z = {s: {m: unit(6, 4, seed=hash((s, m)) % 1000) for m in ms}
         for s, ms in {"av": "av", "vt": "vt", "avt": "avt"}.items()}
    present = {"a": random_mask(6, 1), "v": torch.ones(6, dtype=torch.bool), "t": random_mask(6, 2)}
    total, terms = lava_loss(z, present)
    assert set(terms) == {"av", "vt", "avt"}
    assert terms["av"].item() == pytest.approx(brute_nce(z["av"]["a"], z["av"]["v"], present["a"], 0.07, "symmetric"))
    assert terms["vt"].item() == pytest.approx(brute_nce(z["vt"]["v"], z["vt"]["t"], present["t"], 0.07, "symmetric"))
    assert terms["avt"].item() == pytest.approx(brute_centroid(z["avt"], present, 0.07, "symmetric"))
    assert total.item() == pytest.approx(sum(t.item() for t in terms.values()))
    total_av, terms_av = lava_loss(z, present, losses=("av",))           # Table 2's ablation rows
    assert set(terms_av) == {"av"} and total_av.item() == pytest.approx(terms["av"].item())


def test_minimum_is_the_simplex_value():
    # Positives at cosine 1 and negatives on a regular simplex (cosine -1/(n-1)): the documented minimum.
    n, tau = 8, 0.07
    e = torch.eye(n, dtype=torch.float64)
    simplex = F.normalize(e - e.mean(0), dim=-1)                            # (8, 8), pairwise cosine -1/7
    expected = math.log(1 + (n - 1) * math.exp(-(1 + 1 / (n - 1)) / tau))
    for form in FORMS:
        assert nce(simplex, simplex, None, tau, form).item() == pytest.approx(expected, rel=1e-9)
        # and any perturbation (renormalised) does not go below it
        for seed in range(5):
            y = F.normalize(simplex + 0.05 * unit(n, n, seed=seed), dim=-1)
            assert nce(simplex, y, None, tau, form).item() >= expected


# ----------------------------------------------------------------------------------------------------------------
# masking: no trace of a missing sample


def docstring_plain_nce():
    """plain_nce exactly as losses.py's docstring prints it, compiled from the docstring."""
    import losses
    code = re.search(r"\n( {4}def plain_nce.*?)\n\n", losses.__doc__, re.S).group(1)
    namespace = {"torch": torch, "F": F}
    exec(textwrap.dedent(code), namespace)
    return namespace["plain_nce"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype, rel, atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 1e-6, 1e-7)])
def test_masked_equals_sub_batch(form, dtype, rel, atol):
    """The masked nce equals the docstring's plain_nce (F.cross_entropy / logsumexp) on the valid rows, in value
    and in the gradients of those rows (the other rows' gradients are 0, test_missing_slots_...); float32 is
    what training computes the losses in."""
    plain_nce = docstring_plain_nce()
    for seed in range(10):
        x = unit(12, 8, seed=seed, dtype=dtype).requires_grad_()
        y = unit(12, 8, seed=seed + 1, dtype=dtype).requires_grad_()
        mask = random_mask(12, seed)
        masked, plain = nce(x, y, mask, 0.07, form), plain_nce(x[mask], y[mask], 0.07, form)
        assert masked.item() == pytest.approx(plain.item(), rel=rel)
        assert masked.item() == pytest.approx(nce(x[mask], y[mask], None, 0.07, form).item(), rel=rel)
        for a, b in zip(torch.autograd.grad(masked, (x, y)), torch.autograd.grad(plain, (x, y))):
            assert torch.allclose(a, b, rtol=100 * rel, atol=atol)


def test_centroid_masked_equals_sub_batch_of_each_modality():
    for seed in range(5):
        z = {m: unit(10, 6, seed=seed * 3 + k) for k, m in enumerate("avt")}
        present = {m: random_mask(10, seed * 3 + k + 7) for k, m in enumerate("avt")}
        # term m on the sub-batch where m is present, with c computed from the full rows
        c = sum(torch.where(present[m][:, None], z[m], 0) for m in "avt")
        c = c / sum(present[m].double() for m in "avt").clamp(min=1)[:, None]
        expected = sum(nce(z[m][present[m]], c[present[m]]) for m in "avt")
        assert centroid_loss(z, present).item() == pytest.approx(expected.item(), rel=1e-10)


def _poison(t, valid, value):
    t = t.clone()
    t[~valid] = value
    return t


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("garbage", (float("nan"), float("inf"), -1e30, "random"))
def test_missing_slots_change_neither_loss_nor_gradients(form, garbage):
    x0, y0 = unit(9, 5, seed=3), unit(9, 5, seed=4)
    mask = random_mask(9, 5)
    xa, ya = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    la = nce(xa, ya, mask, 0.07, form)
    la.backward()
    value = unit(9, 5, seed=9) * 7 if garbage == "random" else garbage
    xb = _poison(x0, mask, value[~mask] if garbage == "random" else value).requires_grad_()
    yb = _poison(y0, mask, value[~mask] if garbage == "random" else value).requires_grad_()
    lb = nce(xb, yb, mask, 0.07, form)
    lb.backward()
    assert lb.item() == la.item()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(ya.grad, yb.grad)
    assert torch.all(xb.grad[~mask] == 0) and torch.all(yb.grad[~mask] == 0)


def test_centroid_and_lava_ignore_nan_in_missing_slots():
    z = {m: unit(8, 4, seed=k) for k, m in enumerate("avt")}
    present = {"a": random_mask(8, 1), "v": torch.ones(8, dtype=torch.bool), "t": random_mask(8, 2)}
    emb = {"av": {"a": z["a"], "v": z["v"]}, "vt": {"v": z["v"], "t": z["t"]}, "avt": z}

    def run(emb):
        leaves = {(s, m): t.clone().requires_grad_() for s in emb for m, t in emb[s].items()}
        total, _ = lava_loss({s: {m: leaves[s, m] for m in emb[s]} for s in emb}, present)
        total.backward()
        return total.item(), {k: v.grad for k, v in leaves.items()}

    clean_loss, clean_grads = run(emb)
    bad = {s: {m: _poison(t, present[m], float("nan")) for m, t in d.items()} for s, d in emb.items()}
    bad_loss, bad_grads = run(bad)
    assert bad_loss == clean_loss
    for k in clean_grads:
        assert torch.equal(clean_grads[k], bad_grads[k])


# ----------------------------------------------------------------------------------------------------------------
# invariances, degenerate batches, gradients


@pytest.mark.parametrize("form", FORMS)
def test_temperature_scaling_and_symmetry(form):
    x, y = unit(6, 4, seed=1), unit(6, 4, seed=2)
    mask = random_mask(6, 3)
    base = nce(x, y, mask, 0.07, form).item()
    # s_ij depends only on x . y / tau: scaling the embeddings by k is the same as dividing tau by k
    assert nce(3 * x, y, mask, 0.21, form).item() == pytest.approx(base, rel=1e-12)
    # both forms are symmetric in the two modalities
    assert nce(y, x, mask, 0.07, form).item() == pytest.approx(base, rel=1e-12)
    # a lower temperature sharpens: with perfect alignment the loss falls as tau falls
    assert nce(x, x, None, 0.05, form) < nce(x, x, None, 0.5, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n_valid", (0, 1))
def test_fewer_than_two_valid_is_zero_with_zero_grad(form, n_valid):
    x, y = unit(5, 3, seed=0).requires_grad_(), unit(5, 3, seed=1).requires_grad_()
    mask = torch.zeros(5, dtype=torch.bool)
    mask[:n_valid] = True
    loss = nce(x, y, mask, 0.07, form)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.all(x.grad == 0) and torch.all(y.grad == 0)

    z = {m: unit(5, 3, seed=k).requires_grad_() for k, m in enumerate("avt")}
    present = {m: mask.clone() for m in "avt"}
    emb = {"av": {"a": z["a"], "v": z["v"]}, "vt": {"v": z["v"], "t": z["t"]}, "avt": z}
    total, terms = lava_loss(emb, present, form=form)
    total.backward()
    assert total.item() == 0.0 and all(t.item() == 0.0 for t in terms.values())
    assert all(torch.all(t.grad == 0) for t in z.values())


def test_gradcheck_float64():
    x, y = unit(5, 3, seed=0).requires_grad_(), unit(5, 3, seed=1).requires_grad_()
    mask = torch.tensor([True, False, True, True, False])
    for form in FORMS:
        assert torch.autograd.gradcheck(lambda a, b: nce(a, b, mask, 0.3, form), (x, y))
    a, v, t = (unit(5, 3, seed=k).requires_grad_() for k in range(3))
    present = {"a": mask, "v": torch.ones(5, dtype=torch.bool), "t": torch.tensor([True, True, False, True, True])}
    # (detach_centroid=True is deliberately not the gradient of the loss value, so gradcheck does not apply)
    for normalize in (False, True):
        f = lambda a, v, t: centroid_loss({"a": a, "v": v, "t": t}, present, 0.3, normalize_centroid=normalize)
        assert torch.autograd.gradcheck(f, (a, v, t))


@pytest.mark.parametrize("normalize", (False, True))
def test_detach_centroid_gradient_is_the_stop_gradient_one(normalize):
    """detach_centroid=True: the same loss value, and exactly the gradient of the loss whose centroid is built by
    hand from detached embeddings (a constant target); the default lets the gradient through c and differs."""
    z = {m: unit(6, 4, seed=k).requires_grad_() for k, m in enumerate("avt")}
    present = {"a": random_mask(6, 1), "v": torch.ones(6, dtype=torch.bool), "t": random_mask(6, 2)}
    c = sum(torch.where(present[m][:, None], z[m].detach(), 0) for m in "avt")
    c = c / sum(present[m].double() for m in "avt")[:, None]                 # (6, 4), no graph behind it
    if normalize:
        c = F.normalize(c, dim=-1)
    by_hand = sum(nce(z[m], c, present[m]) for m in "avt")
    stop = centroid_loss(z, present, normalize_centroid=normalize, detach_centroid=True)
    flow = centroid_loss(z, present, normalize_centroid=normalize)
    assert stop.item() == flow.item() == pytest.approx(by_hand.item(), rel=1e-12)
    g_hand, g_stop, g_flow = (torch.autograd.grad(loss, list(z.values())) for loss in (by_hand, stop, flow))
    for a, b in zip(g_stop, g_hand):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    assert not all(torch.allclose(a, b) for a, b in zip(g_flow, g_hand))


def test_autocast_bf16_is_computed_in_float32():
    x, y = unit(16, 8, seed=0, dtype=torch.float32), unit(16, 8, seed=1, dtype=torch.float32)
    ref = nce(x, y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nce(x, y)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref, rel=1e-6)


def test_bad_arguments_raise():
    x = unit(4, 3)
    with pytest.raises(ValueError, match="form"):
        nce(x, x, form="eq1")
    with pytest.raises(ValueError, match="unknown losses"):
        lava_loss({}, {}, losses=("va",))


# ----------------------------------------------------------------------------------------------------------------
# distributed: 2 gloo processes with batch B == 1 process with batch 2B (loss and parameter gradients after DDP)


def _tiny_model():
    from model import AudioConfig, LAVA, LAVAConfig, TextConfig, VideoConfig
    torch.manual_seed(0)
    kw = dict(width=16, depth=1, heads=2)
    cfg = LAVAConfig(video=VideoConfig(frames=2, grid=2, feature_dim=8, **kw), audio=AudioConfig(frames=4, **kw),
                     text=TextConfig(vocab_size=20, pad_id=19, max_len=6, **kw), embed_dim=8)
    return LAVA(cfg).double()


def _global_batch(B):
    g = torch.Generator().manual_seed(1)
    video = torch.randn(B, 2, 2, 2, 8, generator=g, dtype=torch.float64)
    audio = torch.randn(B, 80, 4, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 19, (B, 6), generator=g)
    present = {"a": torch.rand(B, generator=g) < 0.7, "v": torch.ones(B, dtype=torch.bool),
               "t": torch.rand(B, generator=g) < 0.7}
    tokens[~present["t"]] = 19
    return video, audio, tokens, present


def _loss_and_grads(model, video, audio, tokens, present):
    total, terms = lava_loss(model(video, audio, tokens), present)
    total.backward()
    return {"total": total.detach(), **{k: v.detach() for k, v in terms.items()}}


def _ddp_worker(rank, world, init, B, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_tiny_model())
    video, audio, tokens, present = _global_batch(world * B)
    sl = slice(rank * B, (rank + 1) * B)
    losses = _loss_and_grads(model, video[sl], audio[sl], tokens[sl], {m: p[sl] for m, p in present.items()})
    grads = {k: p.grad for k, p in model.module.named_parameters() if p.grad is not None}
    torch.save({"losses": losses, "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process_with_double_batch(tmp_path):
    B, world = 4, 2
    mp.spawn(_ddp_worker, args=(world, f"file://{tmp_path}/rendezvous", B, str(tmp_path)), nprocs=world, join=True)

    model = _tiny_model()
    ref = _loss_and_grads(model, *_global_batch(world * B))
    ref_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert ref["avt"] > 0 and ref["av"] > 0 and ref["vt"] > 0
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k in ref:
            assert torch.allclose(got["losses"][k], ref[k], rtol=1e-12, atol=0), k
        assert set(got["grads"]) == set(ref_grads)
        for k in ref_grads:
            assert torch.allclose(got["grads"][k], ref_grads[k], rtol=1e-9, atol=1e-13), k

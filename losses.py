"""LAVA's objective (paper Section 2, Eqs. 1-5) as pure functions of embeddings and boolean presence masks.

    from losses import lava_loss
    emb = model(video, audio, tokens)                                   # {space: {modality: (B, d) unit rows}}
    present = {"a": has_audio, "v": torch.ones_like(has_audio), "t": has_text}   # (B,) bool each
    total, terms = lava_loss(emb, present)                              # terms = {"av": ., "vt": ., "avt": .}

    L_LAVA = L_AV + L_VT + L_AVT                                                     (Eq. 5)
    L_AV   = NCE(g_av(z_a), g_av(z_v))          over samples with audio and video    (Eq. 2)
    L_VT   = NCE(g_vt(z_v), g_vt(z_t))          over samples with video and text     (Eq. 3)
    L_AVT  = sum_m NCE(g_avt(z_m), c),  c_i = mean of the present g_avt(z_m,i)       (Eq. 4)

NCE on a batch where every sample has both modalities, in plain torch (tests/test_losses.py runs this code):

    def plain_nce(x, y, temperature=0.07, form="symmetric"):    # x, y: (n, D), row i of both = sample i
        logits = x @ y.T / temperature                          # (n, n) s_ij, the positives on the diagonal
        if form == "symmetric":                                 # InfoNCE both ways (CLIP's, the authors' code)
            labels = torch.arange(len(x), device=x.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return logits.flatten().logsumexp(0) - logits.diagonal().logsumexp(0)     # Eq. 1 as printed

Missing modalities (paper, Section 3: "masked out during loss calculation"): `nce(x, y, mask)` equals
plain_nce(x[mask], y[mask]). A sample whose modality is missing takes no part in a term: not as an anchor, a
positive, a negative, nor in any denominator, and whatever its missing slot holds (zeros, garbage, NaN, inf)
changes neither the loss nor any gradient. The masked form is what lets a batch keep one shape (compile, DDP).

Distributed: `lava_loss` all-gathers embeddings and masks, so N ranks with B samples each give exactly the loss and
(after DDP's averaging) the gradients of one process with batch N*B (`_AllGather`); `nce` itself never communicates.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def nce(x, y, mask=None, temperature=0.07, form="symmetric"):
    r"""Contrastive NCE loss between rows of x and y (row i of both = sample i).

    x, y: (B, D) embeddings (LAVA's are L2-normalised, so x_i . y_j is a cosine); mask: (B,) bool, True where
    BOTH x_i and y_i exist (None = all). Let V = {i : mask_i}, n = |V|, s_ij = x_i . y_j / tau.

    form="symmetric" (default; the authors' released research code, and CLIP's loss): the mean over valid
        samples of the two InfoNCE directions, x_i against all valid y_j and y_i against all valid x_j:

            L = 1/(2n) sum_{i in V} [ -log(e^{s_ii} / sum_{j in V} e^{s_ij}) - log(e^{s_ii} / sum_{j in V} e^{s_ji}) ]

    form="paper_eq1": Eq. (1) exactly as printed, one log-ratio of the summed positives against the summed
        positives plus all cross pairs (symmetric in x and y too: swapping them transposes s):

            L = -log( sum_{i in V} e^{s_ii} / ( sum_{i in V} e^{s_ii} + sum_{i in V} sum_{j in V, j != i} e^{s_ij} ) )
              = logsumexp_{i,j in V} s_ij - logsumexp_{i in V} s_ii

    Both forms have the same minimum over unit vectors, log(1 + (n-1) e^{-(1 + 1/(n-1))/tau}) for n <= D+1
    (positives at cosine 1, negatives on a regular simplex at cosine -1/(n-1)); about 5.7e-7 for n = 8, tau 0.07.
    Returns a 0-dim tensor; 0 with zero gradient when n < 2.
    """
    if form not in ("symmetric", "paper_eq1"):
        raise ValueError(f"form must be 'symmetric' or 'paper_eq1', got {form!r}")
    dtype = torch.promote_types(x.dtype, torch.float32)  # autocast's bf16 compared in float32: logits reach 1/tau
    valid = torch.ones(len(x), dtype=torch.bool, device=x.device) if mask is None else mask.to(x.device, torch.bool)
    # Scrub missing slots before any arithmetic: masking logits later is not enough, because 0 * NaN = NaN would
    # leak a NaN/inf held in a missing row into the loss or, through the matmul's backward, into the gradients.
    x, y = (torch.where(valid[:, None], t.to(dtype), 0.0) for t in (x, y))  # (B, D) each
    n = valid.sum()

    # autocast would run the matmul in bf16 again; the loss is tiny next to the encoders, so keep it exact.
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = (x @ y.T) / temperature                                    # (B, B) s_ij = x_i . y_j / tau
    # An invalid column is -inf: exp(-inf) = 0 exactly, so it is neither a negative nor in any denominator,
    # and its softmax weight (hence its gradient) is exactly 0.
    logits = logits.masked_fill(~(valid[:, None] & valid[None, :]), float("-inf"))  # (B, B), finite iff i, j valid
    diag = torch.diagonal(logits)                                           # (B,) s_ii (-inf where invalid)

    if form == "symmetric":
        # An invalid ROW is all -inf; replace it by zeros so its logsumexp is finite (log B) rather than NaN,
        # then give it weight 0. Rows of logits = anchors x_i; rows of logits.T = anchors y_i.
        lx = torch.where(valid[:, None], logits, 0.0).logsumexp(dim=1) - torch.where(valid, diag, 0.0)    # (B,) x -> y
        ly = torch.where(valid[:, None], logits.T, 0.0).logsumexp(dim=1) - torch.where(valid, diag, 0.0)  # (B,) y -> x
        loss = torch.where(valid, lx + ly, 0.0).sum() / (2 * n.clamp(min=1))
    else:
        # With no valid sample every entry is -inf and the difference would be NaN: use zeros then (finite,
        # weighted by 0 below). Otherwise the -inf entries drop out of both sums exactly.
        loss = torch.where(n > 0, logits, 0.0).flatten().logsumexp(0) - torch.where(n > 0, diag, 0.0).logsumexp(0)
    # < 2 valid samples: no negative exists. A multiplication (no python branch) keeps the term in the graph with
    # zero gradient, so backward() and DDP still work.
    return loss * (n >= 2).to(dtype)


def centroid_loss(z, present, temperature=0.07, normalize_centroid=False, detach_centroid=False, form="symmetric"):
    r"""Centroid contrastive loss, Eq. (4): L_AVT = sum_{m in {a,v,t}} NCE(g_avt(z_m), c).

    z: {"a","v","t"} -> (B, D) g_avt embeddings; present: same keys -> (B,) bool.
    c_i = sum_m present_m,i z_m,i / sum_m present_m,i: the mean of the modalities sample i has ((z_a + z_v + z_t) / 3
    when all are). Term m is NCE(z_m, c, mask=present_m): anchors, positives and negatives are the samples with
    modality m; one with only m has c_i = z_m,i (a trivial positive) and still serves as anchor and negative.

    normalize_centroid=False (paper): c is the plain average, not re-normalised, so |c_i| <= 1 and s(z, c) is the
        dot product that Eq. (1)'s s() uses. True: c / |c|, a cosine like the other terms.
    detach_centroid=False (paper: no stop-gradient): gradients flow into every z_m through c too; True: c is a constant.
    """
    mods = [m for m in ("a", "v", "t") if m in z]
    dtype = torch.promote_types(z[mods[0]].dtype, torch.float32)
    masks = {m: present[m].to(z[m].device, torch.bool) for m in mods}
    # Scrub missing slots first (see nce): a NaN in a missing slot must not reach c through 0 * NaN.
    clean = {m: torch.where(masks[m][:, None], z[m].to(dtype), 0.0) for m in mods}
    count = sum(masks[m].to(dtype) for m in mods)                          # (B,) present modalities per sample
    c = sum(clean.values()) / count.clamp(min=1)[:, None]                   # (B, D); 0 where nothing is present
    if normalize_centroid:
        c = F.normalize(c, dim=-1)
    if detach_centroid:
        c = c.detach()
    return sum(nce(clean[m], c, masks[m], temperature, form) for m in mods)


def lava_loss(emb, present, losses=("av", "vt", "avt"), temperature=0.07, form="symmetric",
              normalize_centroid=False, detach_centroid=False):
    """L_LAVA, Eq. (5): the sum of the requested terms. Returns (total, {term: value}) with 0-dim tensors.

    emb: LAVA.forward's {space: {modality: (B, d)}} with at least the spaces in `losses`; present: {"a","v","t"} ->
    (B,) bool, True where the sample has that modality.
    losses: subset of ("av", "vt", "avt") (Table 2's ablation: ("av",), ("av", "vt"), all three).
    """
    unknown = set(losses) - {"av", "vt", "avt"}
    if unknown:
        raise ValueError(f"unknown losses {sorted(unknown)}; choose from av, vt, avt")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        emb, present = gather(emb, present, losses)
    terms = {}
    if "av" in losses:
        terms["av"] = nce(emb["av"]["a"], emb["av"]["v"], present["a"] & present["v"], temperature, form)
    if "vt" in losses:
        terms["vt"] = nce(emb["vt"]["v"], emb["vt"]["t"], present["v"] & present["t"], temperature, form)
    if "avt" in losses:
        terms["avt"] = centroid_loss(emb["avt"], present, temperature, normalize_centroid, detach_centroid, form)
    return sum(terms.values()), terms


# distributed ----------------------------------------------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward is its true adjoint: sum the gradients of all ranks, keep own slice.

    Every rank computes the SAME global loss L on the gathered batch, and sends back dL/d(all rows). Row block r's
    total gradient is therefore the same on every rank; summing over ranks gives world_size * dL/d(block r) on
    rank r. DDP then averages parameter gradients over ranks (divides by world_size), which leaves exactly
    sum_r dL/d(block r) * d(block r)/d(theta) = dL/d(theta) of one process with the whole batch.
    (open_clip's variant, all_gather then put the local tensor back into its own slice, gives 1/world_size of it.)
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.own = slice(dist.get_rank() * len(x), (dist.get_rank() + 1) * len(x))  # this rank's rows of the output
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.own]


def gather(emb, present, losses):
    """All-gather the embeddings the `losses` need (with gradient, `_AllGather`; one collective, concatenated along
    features) and the masks. Same B on every rank: global row r * B + i is rank r's sample i in every modality."""
    keys = [(s, m) for s in ("av", "vt", "avt") if s in losses for m in emb[s]]
    flat = _AllGather.apply(torch.cat([emb[s][m] for s, m in keys], dim=1))  # (B, K*d) on each rank -> (N*B, K*d)
    parts = dict(zip(keys, flat.split([emb[s][m].shape[1] for s, m in keys], dim=1)))  # (s, m) -> (N*B, d)
    out = {s: {m: parts[s, m] for m in emb[s]} for s in losses}
    mods = sorted(present)
    masks = torch.stack([present[m].to(flat.device, torch.uint8) for m in mods], dim=1)  # (B, M); gloo has no bool
    masks = _AllGather.apply(masks).bool()                                  # (N*B, M), no gradient to carry
    return out, {m: masks[:, k] for k, m in enumerate(mods)}

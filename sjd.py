"""Speculative Jacobi decoding (SJD): several image tokens per forward pass, same distribution.

What it is: Lumina-mGPT 2.0's `--speculative_jacobi` sampler (Teng et al., arXiv 2410.01699) in its exact
form (docs/sjd.md §1-2). It runs sample.py's decode `step` and ONE sampling function `probs_fn`, so it
returns exact samples of what plain decoding samples. Each pass feeds [last final token + window-1 drafts],
tests the drafts left to right, redraws the first rejected one from the residual, and keeps the pass's other
draws as the next drafts. Rewinding is writing at an earlier cache position.
What it is not: the official variant (lossy residual, top-n-sigma on, CFG late: docs/sjd.md §2),
a draft model, or a text decoder: the window runs over the image body only.

  python sample.py --prompt "a red circle" --sjd [--sjd_window 16] [--sjd_init spatial]
"""
import torch
import torch.nn.functional as F

INITS = ("random", "spatial")  # fresh drafts: a uniform image code (official), or the code one row up
RESIDUALS = ("exact", "official")  # --sjd_residual: residual or official_residual
EMPTY_RESIDUAL = 1e-6  # residual mass below this: p == q up to rounding
# tokens per pass by device: 16 (official) where a window costs about one step (a GPU, memory-bound); 1, plain
# decoding, on a CPU, where a window costs ~its length and windows of 2-16 measured 0.7-0.9x plain (docs/sjd.md §4)
WINDOW = {"cuda": 16, "cpu": 1}
OFFICIAL_DRAFT_CAP = 0.99  # the official residual caps draft probabilities here (docs/sjd.md §2)


def add_sjd_args(parser):
    parser.add_argument("--sjd", action="store_true", help="speculative Jacobi decoding (sjd.py)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--sjd_window", type=int, default=WINDOW[device],
                        help=f"tokens per forward pass (official 16; 1: plain; default here {WINDOW[device]})")
    parser.add_argument("--sjd_init", default="random", choices=INITS, help="fresh drafts (docs/sjd.md §3)")
    parser.add_argument("--sjd_residual", default="exact", choices=RESIDUALS,
                        help="'official': its lossy residual instead of the exact one (docs/sjd.md §2)")


def accept(p_draft, q_draft, u):
    """Keep draft x with probability min(1, p(x)/q(x)), u ~ U[0, 1) (docs/sjd.md §2). (B, T) -> bool (B, T)."""
    return u * q_draft < p_draft


def residual(p, q):
    """Where a draft was rejected, draw from norm(max(p - q, 0)); an empty residual means p == q, where
    a rejection has probability ~0: fall back to p."""
    r = (p - q).clamp(min=0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > EMPTY_RESIDUAL, r / mass.clamp(min=1e-30), p)


def official_residual(p, q):
    """The official residual norm(max(p - min(q, 0.99), 0)) (docs/sjd.md §2): opt-in, it is lossy. A one-hot
    draft x has q(x) = 1 > 0.99, so where p(x) > 0.99 the rejected draft keeps mass and is drawn again."""
    return residual(p, q.clamp(max=OFFICIAL_DRAFT_CAP))


def filter_top_n_sigma(probs, n):
    """The official top-n-sigma filter (docs/sjd.md §3): keep ids whose log-prob is >= max - n*sigma,
    sigma over the ids still allowed. Changes the target distribution: opt-in only."""
    logp, kept = probs.log(), probs > 0  # (..., V)
    count = kept.sum(-1, keepdim=True)
    mean = torch.where(kept, logp, 0).sum(-1, keepdim=True) / count
    sigma = (torch.where(kept, logp - mean, 0).pow(2).sum(-1, keepdim=True) / count).sqrt()
    probs = torch.where(logp >= logp.amax(-1, keepdim=True) - n * sigma, probs, 0)
    return probs / probs.sum(-1, keepdim=True)


def draw(probs, generator=None):
    """probs (..., V) -> columns (...): one multinomial draw per row."""
    return torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(probs.shape[:-1])


def to_ids(columns, plan, layout):
    """Columns of sample.logits_to_probs (B, T) at plan (T,) -> token ids: the forced id, or image code `column`."""
    return torch.where(plan >= 0, plan, columns + layout.image_code_offset)


def to_columns(ids, plan, layout):
    """The inverse of to_ids: token ids (B, T) at plan (T,) -> columns (0 where the plan forces the id)."""
    return torch.where(plan >= 0, 0, ids - layout.image_code_offset)


def fresh_drafts(seq, start, stop, plan, row_len, init, layout, generator):
    """Write new drafts for tokens start..stop-1 of every row into seq; return their q (B, T, codes),
    one-hot at the draft, which is exact however the draft was chosen (docs/sjd.md §2). 'spatial'
    copies the code one row up where seq holds it; forced positions get their forced id."""
    B, device = seq.shape[0], seq.device
    pos = torch.arange(start, max(start, stop), device=device)  # (T,), empty when nothing is new
    tokens = layout.image_code_offset + torch.randint(layout.codebook_size, (B, len(pos)), device=device,
                                                      generator=generator)  # (B, T)
    if init == "spatial":
        above = pos - row_len
        tokens = torch.where((above >= 0) & (above < start), seq[:, above.clamp(min=0)], tokens)
    tokens = torch.where(plan[pos] >= 0, plan[pos], tokens)
    seq[:, start:stop] = tokens
    return F.one_hot(to_columns(tokens, plan[pos], layout), layout.codebook_size).float()


def sjd_pass(step, target, seq, q, done, w0, L, start_pos, plan, layout, generator, official=False):
    """One forward pass over tokens w0..w0+L-1 (fed w0-1..w0+L-2): test the drafts, replace the first
    rejected one, write the Jacobi drafts after it -> (p (B, L, codes), done (B,): each row's new frontier).
    official: redraw from official_residual instead of the exact residual."""
    B, device = seq.shape[0], seq.device
    slot, rows = torch.arange(L, device=device), torch.arange(B, device=device)
    out = step(seq[:, w0 - 1:w0 + L - 1], start_pos + w0 - 1)  # (rows, L, V or codes)
    p = target(out, plan[w0:w0 + L])  # (B, L, columns): p[:, j] is the target of token w0 + j
    drafts = to_columns(seq[:, w0:w0 + L - 1], plan[w0:w0 + L - 1], layout)[..., None]  # (B, L-1, 1)
    u = torch.rand(B, L - 1, device=device, generator=generator)
    final = (w0 + slot[:-1])[None] < done[:, None]  # (B, L-1): tokens a row already owns
    ok = final | accept(p[:, :-1].gather(-1, drafts)[..., 0], q.gather(-1, drafts)[..., 0], u)
    r = ok.long().cumprod(1).sum(1)  # (B,): first rejected slot, L-1 when all drafts passed
    # slot r: the rejected draft's replacement, or (all passed) a free draw from p at the last slot
    q_r = torch.where((r < L - 1)[:, None], q[rows, r.clamp(max=L - 2)], 0.0)  # (B, codes)
    z = to_ids(draw((official_residual if official else residual)(p[rows, r], q_r), generator), plan[w0 + r],
               layout)  # (B,)
    y = to_ids(draw(p, generator), plan[w0:w0 + L], layout)  # (B, L): the Jacobi update, next drafts with q = p
    old = seq[:, w0:w0 + L]
    seq[:, w0:w0 + L] = torch.where(slot == r[:, None], z[:, None], torch.where(slot > r[:, None], y, old))
    return p, w0 + r + 1


def sjd_generate(step, logits, plan, start_pos, probs_fn, layout, *, generator=None, window=16, init="random",
                 top_n_sigma=None, residual="exact"):
    """Sample len(plan) image tokens by SJD -> (tokens (B, n), stats: forward_passes (the prefill counts),
    tokens, mean_accepted, step_compression). step, logits, plan, start_pos, probs_fn: as in sample.py's
    decode_n_tokens; window: tokens per forward (official 16); top_n_sigma: None or the official filter's n;
    residual: "exact" or "official" (RESIDUALS)."""
    if init not in INITS:
        raise ValueError(f"unknown SJD init {init!r}; choose one of {', '.join(INITS)}")
    if window < 2:
        raise ValueError(f"an SJD window of {window} has no room for drafts; use 2 or more (official 16)")
    if residual not in RESIDUALS:
        raise ValueError(f"unknown SJD residual {residual!r}; choose one of {', '.join(RESIDUALS)}")
    device = logits.device
    plan, n = plan.to(device), len(plan)
    forced = (plan >= 0).nonzero()
    row_len = int(forced[0]) + 1 if len(forced) else n  # code_w + 1: the first EOL ends row 0

    def target(out, positions_plan):
        probs = probs_fn(out, positions_plan)
        return probs if top_n_sigma is None else filter_top_n_sigma(probs, top_n_sigma)

    seq = F.pad(to_ids(draw(target(logits, plan[:1]), generator), plan[:1], layout), (0, n - 1))  # from the prefill
    B = len(seq)  # seq (B, n): final tokens before done[b], drafts after
    L = min(window, n - 1)  # tokens per forward: the last final token + L-1 drafts
    if L < 2:  # a plan of 1 or 2 tokens: no room for drafts, plain steps
        for i in range(1, n):
            out = step(seq[:, i - 1:i], start_pos + i - 1)
            seq[:, i] = to_ids(draw(target(out, plan[i:i + 1]), generator), plan[i:i + 1], layout)[:, 0]
        return seq, {"forward_passes": n, "tokens": n, "mean_accepted": float(n - 1), "step_compression": 1.0}
    # The window starts at the slowest row's frontier (the batch rule, docs/sjd.md §2) and near the
    # end slides back over final tokens instead of shrinking: every pass has the same shape.
    w0, done = 1, torch.ones(B, dtype=torch.long, device=device)
    q = fresh_drafts(seq, 1, L, plan, row_len, init, layout, generator)  # (B, L-1, columns): tokens 1..L-1
    passes, active = 0, 0  # active: row-passes of rows not yet done; together they accept B*(n-1) tokens
    official = residual == "official"  # docs/sjd.md §2
    while True:
        active += int((done < n).sum())
        p, done = sjd_pass(step, target, seq, q, done, w0, L, start_pos, plan, layout, generator, official)
        passes, frontier = passes + 1, int(done.min())
        if frontier >= n:
            break
        w1 = min(frontier, n - L)
        shift, keep = w1 - w0, min(L - (w1 - w0), L - 1)
        q = torch.cat([p[:, shift:shift + keep],
                       fresh_drafts(seq, w0 + L, w1 + L - 1, plan, row_len, init, layout, generator)], 1)
        w0 = w1
    return seq, {"forward_passes": 1 + passes, "tokens": n, "mean_accepted": B * (n - 1) / active,
                 "step_compression": n / (1 + passes)}

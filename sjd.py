"""Speculative Jacobi decoding (SJD): several image tokens per forward pass, same distribution.

What it is: the `--speculative_jacobi` sampler of Lumina-mGPT 2.0 (../shared/specs/lumina_mgpt2.md
§4.4), after Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free
Speculative Jacobi Decoding" (arXiv 2410.01699; ../shared/specs/performance.md §1.1). It runs on
sample.py's model, static KV cache, token layout and ONE sampling function (`probs_fn`: CFG,
structure constraint, top-k, temperature), so it returns exact samples of what plain decoding
samples. Each pass feeds [last final token + window-1 drafts] at their cache positions, reads the
target p at every position, accepts drafts left to right with probability min(1, p(x)/q(x)),
replaces the first rejected one by a draw from norm(max(p - q, 0)), and keeps the pass's other
draws as the next drafts (the Jacobi iteration). Rewinding is writing at an earlier position.

What it is not, and where it differs from the official code (on purpose, to stay lossless):
  - the official top-n-sigma filter changes the target distribution (it is not in the plain path,
    §4.4); here it is the opt-in argument `top_n_sigma` (off by default);
  - the residual is the exact norm(max(p - q, 0)), not the official max(p - min(q, 0.99), 0);
  - CFG is on from the first image token (the official SJD skips it for 3 loop steps), and the
    window covers the whole image body (official: from token l=3 to r, §4.4);
  - no draft model, no training, no text decoding: the window runs over the image body only.

  python sample.py --prompt "a red circle" --sjd [--sjd_window 16] [--sjd_init spatial]
"""
import torch


def accept(p_draft, q_draft, u):
    """Speculative sampling's test (arXiv 2410.01699, after Leviathan et al. 2023): keep draft x
    with probability min(1, p(x)/q(x)), with u ~ U[0, 1). All (B, T) -> bool (B, T)."""
    return u * q_draft < p_draft


def residual(p, q):
    """Where a draft was rejected, draw from norm(max(p - q, 0)) (performance.md §1.1). An empty
    residual means p == q up to rounding, where a rejection has probability ~0: fall back to p."""
    r = (p - q).clamp(min=0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 1e-6, r / mass.clamp(min=1e-30), p)


def filter_top_n_sigma(probs, n):
    """The official TopnsigmaLogitsWarper3d (§4.4): keep tokens whose logit is >= max - n*sigma,
    sigma over the tokens still allowed (population sigma; the official estimator is unchecked).
    Log-probs are logits/temperature minus a constant, so the rule reads the same on them.
    Changes the target distribution: opt-in only."""
    logp, kept = probs.log(), probs > 0  # (..., V)
    count = kept.sum(-1, keepdim=True)
    mean = torch.where(kept, logp, 0).sum(-1, keepdim=True) / count
    sigma = (torch.where(kept, logp - mean, 0).pow(2).sum(-1, keepdim=True) / count).sqrt()
    probs = torch.where(logp >= logp.amax(-1, keepdim=True) - n * sigma, probs, 0)
    return probs / probs.sum(-1, keepdim=True)


def draw(probs, generator=None):
    """probs (..., V) -> ids (...): one multinomial draw per row."""
    return torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(probs.shape[:-1])


def fresh_drafts(seq, start, stop, plan, row_len, init, layout, vocab_size, generator):
    """Write new drafts for tokens start..stop-1 of every row into seq; return their q (B, T, V).

    'random' is the official scheme: a uniform image code (§4.4). 'spatial' copies the code one row
    up (a spatial-prior init of the SJD code, performance.md §1.1) where that token is already in
    seq, final or draft; the first generated row stays random. Forced positions (EOL, image end)
    get their forced id. q is one-hot at the draft, which keeps the test exact however the token
    was chosen, as long as it does not look at the coins that test it: it is accepted with
    probability p(x), else y ~ p without x, so
    P(y) = P(x=y) p(y) + sum_{x != y} P(x) (1 - p(x)) p(y) / (1 - p(x)) = p(y).
    """
    B, device = seq.shape[0], seq.device
    pos = torch.arange(start, max(start, stop), device=device)  # (T,), empty when nothing is new
    tokens = layout.image_code_offset + torch.randint(layout.codebook_size, (B, len(pos)), device=device,
                                                      generator=generator)  # (B, T)
    if init == "spatial":
        above = pos - row_len
        tokens = torch.where((above >= 0) & (above < start), seq[:, above.clamp(min=0)], tokens)
    tokens = torch.where(plan[pos] >= 0, plan[pos], tokens)
    seq[:, start:stop] = tokens
    return torch.nn.functional.one_hot(tokens, vocab_size).float()


def verify_forward(model, idx, input_pos, key_mask):
    """The one model call of a pass: idx (rows, L) at input_pos (L,), K/V written at input_pos.
    Same shapes every pass, so it compiles once."""
    return model(idx, input_pos, key_mask)


def sjd_generate(model, logits, plan, start_pos, key_mask, probs_fn, *, generator=None, window=16,
                 init="random", use_cfg=True, layout=None, top_n_sigma=None, compile=False):
    """Sample len(plan) image tokens by SJD -> (tokens (B, n), stats dict).

    logits (rows, 1, V): the prefill's last logits (rows = 2B [cond; uncond] with CFG, else B);
    plan (n,): forced id or -1 per position (sequence.image_body_plan); start_pos: absolute position
    of plan[0]; key_mask (rows, S); probs_fn(logits (rows, T, V), plan (T,)) -> probs (B, T, V), the
    same function the plain loop samples from. window: tokens per forward (official 16, §4.4).
    top_n_sigma: None, or n of the official top-n-sigma filter (changes the distribution).
    stats: forward_passes (the prefill counts, as in the plain loop's len(plan)), tokens,
    mean_accepted (tokens a row finalises per SJD pass, over unfinished rows), step_compression
    (tokens / forward_passes), window, init.
    """
    if init not in ("random", "spatial"):
        raise ValueError(f"unknown SJD init {init!r}; choose 'random' or 'spatial'")
    if window < 2:
        raise ValueError(f"an SJD window of {window} has no room for drafts; use 2 or more (official 16)")
    if layout is None:
        raise ValueError("sjd_generate needs the token layout (image code ids for the draft init)")
    device, V = logits.device, logits.shape[-1]
    plan = plan.to(device)
    n, B = len(plan), logits.shape[0] // (2 if use_cfg else 1)
    forced = (plan >= 0).nonzero()
    row_len = int(forced[0]) + 1 if len(forced) else n  # code_w + 1: the first EOL ends row 0

    def target(out, positions_plan):
        probs = probs_fn(out, positions_plan)
        return probs if top_n_sigma is None else filter_top_n_sigma(probs, top_n_sigma)

    step = verify_forward
    if compile:  # one graph for every pass; CUDA graphs replay it without launch overhead
        step = torch.compile(verify_forward, mode="reduce-overhead" if device.type == "cuda" else None,
                             fullgraph=True)
    # seq holds each row's final tokens (before done[b]) and its current drafts (after)
    seq = torch.zeros(B, n, dtype=torch.long, device=device)
    seq[:, 0] = draw(target(logits, plan[:1]), generator)[:, 0]  # plan[0] comes from the prefill
    done = torch.ones(B, dtype=torch.long, device=device)
    L = min(window, n - 1)  # tokens per forward: the last final token + L-1 drafts
    stats = {"window": L, "init": init, "forward_passes": 1, "tokens": n}
    if n == 1:
        return seq, {**stats, "mean_accepted": 0.0, "step_compression": 1.0}
    if L < 2:  # one token after the prefill's: nothing to speculate on, one plain step
        idx = seq[:, :1]
        out = step(model, torch.cat([idx, idx]) if use_cfg else idx, torch.tensor([start_pos], device=device), key_mask)
        seq[:, 1] = draw(target(out, plan[1:2]), generator)[:, 0]
        return seq, {**stats, "forward_passes": 2, "mean_accepted": 1.0, "step_compression": 1.0}
    # The window [w0, w0+L) holds the outputs of a pass: tokens w0..w0+L-1, fed tokens w0-1..w0+L-2.
    # It starts at the slowest row's frontier and stops at the last token: near the end it slides
    # back over final tokens (rewriting the same K/V) instead of shrinking or running off the cache,
    # so every pass has the same shape and writes only real positions.
    w0 = 1
    q = fresh_drafts(seq, 1, L, plan, row_len, init, layout, V, generator)  # (B, L-1, V): tokens w0..w0+L-2
    slot, rows = torch.arange(L, device=device), torch.arange(B, device=device)
    passes, accepted, active = 0, 0, 0
    while True:
        idx = seq[:, w0 - 1:w0 + L - 1]  # (B, L)
        input_pos = torch.arange(L, device=device) + (start_pos + w0 - 1)
        out = step(model, torch.cat([idx, idx]) if use_cfg else idx, input_pos, key_mask)  # (rows, L, V)
        p = target(out, plan[w0:w0 + L])  # (B, L, V): p[:, j] is the target of token w0 + j
        drafts = seq[:, w0:w0 + L - 1, None]  # (B, L-1, 1)
        u = torch.rand(B, L - 1, device=device, generator=generator)
        final = (w0 + slot[:-1])[None] < done[:, None]  # (B, L-1): tokens a row already owns
        ok = final | accept(p[:, :-1].gather(-1, drafts)[..., 0], q.gather(-1, drafts)[..., 0], u)
        r = ok.long().cumprod(1).sum(1)  # (B,): first rejected slot, L-1 when all drafts passed
        # slot r: the rejected draft's replacement, or (all passed) a free draw from p at the last slot
        q_r = torch.where((r < L - 1)[:, None], q[rows, r.clamp(max=L - 2)], 0.0)  # (B, V)
        z = draw(residual(p[rows, r], q_r), generator)  # (B,)
        # the Jacobi update: y ~ p, drawn apart from every coin that will test it, is a valid next
        # draft with q = p (the previous iterate as the draft, performance.md §1.1)
        y = draw(p, generator)  # (B, L)
        old = seq[:, w0:w0 + L]
        seq[:, w0:w0 + L] = torch.where(slot == r[:, None], z[:, None], torch.where(slot > r[:, None], y, old))
        still = done < n
        accepted += ((w0 + r + 1 - done) * still).sum()
        active += still.sum()
        done = w0 + r + 1
        passes += 1
        frontier = int(done.min())
        if frontier >= n:
            break
        # Batch rule. The static cache shares input_pos across rows, so the window starts at the
        # slowest row's frontier; rows ahead keep every token they made final and feed them as
        # given, never re-tested. Each row thus runs single-sequence SJD with a number of draft
        # slots that depends on the other (independent) rows and on its own final tokens, never on
        # its untested drafts or on coins still to come; speculative sampling makes each token it
        # finalises an exact draw of p given its final prefix, whatever the number of slots.
        # (Committing the batch minimum would be exact too, but rows ahead would re-draw tokens.)
        w1 = min(frontier, n - L)
        shift, keep = w1 - w0, min(L - (w1 - w0), L - 1)
        q = torch.cat([p[:, shift:shift + keep],
                       fresh_drafts(seq, w0 + L, w1 + L - 1, plan, row_len, init, layout, V, generator)], 1)
        w0 = w1
    stats.update(forward_passes=1 + passes, mean_accepted=float(accepted) / max(int(active), 1),
                 step_compression=n / (1 + passes))
    return seq, stats

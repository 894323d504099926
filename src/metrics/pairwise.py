"""All-pairs prediction statistics for N models on one split, from their cached predictions
(docs/REFERENCE.md §1.1, §5.1).

Every function takes the predictions of all models at once and returns N x N matrices indexed [teacher, student],
computed with matrix operations (no loop over pairs):

- correctness C (N, n) bool; positive flips pos[t, s] = #(t right, s wrong) = C[t] @ (1 - C[s]), one matmul;
  negative flips are its transpose (neg[t, s] = pos[s, t]).
- per-class positive flips (N, N, K) from one batched matmul per chunk of classes (samples grouped by label);
  their mean, std and entropy over classes, and how many classes hold p% of the positive flips, from the
  histogram of the per-class counts (so the (N, N, K) tensor need not be held).
- top-1 agreement from the per-sample groups of models predicting the same class (one sort): large groups as
  0/1 columns of a matmul, small groups pair by pair.
- predictive KL(teacher || student) = sum_k p_t log p_t - p_t @ log p_s^T over chunks of samples (needs logits).

Pure functions: torch only, nothing else from the suite. They run on the device of their inputs.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import torch

CONCENTRATION_PS = (2, 5, 20, 50)


def _exact_float(n: int) -> torch.dtype:
    """float32 holds every integer count up to 2**24 exactly; beyond that count in float64."""
    return torch.float32 if n < (1 << 24) else torch.float64


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Predicted classes (..., n) from logits (..., n, K), as the smallest integer type that holds them."""
    k = logits.shape[-1]
    return logits.argmax(-1).to(torch.int16 if k <= 32767 else torch.int32)


def correctness(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, n) bool: model m is right on sample i."""
    return preds == labels.to(preds.device, preds.dtype).view(1, -1)


def accuracies(correct: torch.Tensor) -> torch.Tensor:
    """(N,) top-1 accuracy in % of every model."""
    return 100.0 * correct.double().mean(1)


def flip_counts(correct: torch.Tensor) -> torch.Tensor:
    """(N, N) int64 positive flips pos[t, s] = #samples teacher t gets right and student s gets wrong.
    Negative flips are the transpose: neg[t, s] = pos[s, t]."""
    c = correct.to(_exact_float(correct.shape[1]))
    return torch.round(c @ (1.0 - c).T).long()


def entropy_of_counts(counts: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) of the distribution given by non-negative counts along `dim`; 0 where all are 0."""
    c = counts.double()
    tot = c.sum(dim, keepdim=True)
    plogp = torch.xlogy(c, c).sum(dim, keepdim=True)
    h = torch.where(tot > 0, torch.log(tot.clamp_min(1)) - plogp / tot.clamp_min(1), torch.zeros_like(tot))
    return h.squeeze(dim).clamp_min(0.0)


def _class_chunks(correct: torch.Tensor, labels: torch.Tensor, num_classes: int, class_chunk: int = 64):
    """Yield (k0, k1, counts) with counts (k1 - k0, N, N) float: positive flips per class of every ordered pair.

    Samples are grouped by label and padded to the largest class of the chunk (padding is neither right nor
    wrong), so each chunk of classes is one batched matmul (k, N, m) @ (k, m, N)."""
    N, n = correct.shape
    dev = correct.device
    labels = labels.to(dev).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels, minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    slot = torch.arange(n, device=dev) - starts[sorted_labels]  # position of each sample inside its class
    right_sorted = correct[:, order]
    for k0 in range(0, num_classes, class_chunk):
        k1 = min(num_classes, k0 + class_chunk)
        a, b = int(starts[k0]), int(ends[k1 - 1])
        m = int(counts[k0:k1].max())
        fdt = _exact_float(m)
        if m == 0:
            yield k0, k1, torch.zeros((k1 - k0, N, N), dtype=fdt, device=dev)
            continue
        if int(counts[k0:k1].min()) == m:  # balanced chunk (ImageNet val): a view, no padding
            right = right_sorted[:, a:b].to(fdt).view(N, k1 - k0, m).transpose(0, 1)
            wrong = 1.0 - right
        else:
            lab, pos = sorted_labels[a:b] - k0, slot[a:b]
            right = torch.zeros((N, k1 - k0, m), dtype=fdt, device=dev)
            valid = torch.zeros((1, k1 - k0, m), dtype=fdt, device=dev)
            right[:, lab, pos] = right_sorted[:, a:b].to(fdt)
            valid[:, lab, pos] = 1.0
            wrong = (valid - right).transpose(0, 1)
            right = right.transpose(0, 1)
        yield k0, k1, torch.bmm(right, wrong.transpose(1, 2))  # exact integer counts


def per_class_flip_counts(correct: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          class_chunk: int = 64) -> torch.Tensor:
    """(N, N, K) positive flips of every ordered pair per class: out[t, s, k] = #samples of class k that t gets
    right and s wrong. The negative flips per class are out.transpose(0, 1)."""
    N, n = correct.shape
    m = int(torch.bincount(labels.long(), minlength=num_classes).max()) if n else 0
    dt = torch.int16 if m <= 32767 else torch.int32
    out = torch.zeros((num_classes, N, N), dtype=dt, device=correct.device)
    for k0, k1, c in _class_chunks(correct, labels, num_classes, class_chunk):
        out[k0:k1] = torch.round(c).to(dt)
    return out.permute(1, 2, 0).contiguous()


def class_flip_histogram(correct: torch.Tensor, labels: torch.Tensor, num_classes: int, class_chunk: int = 16
                         ) -> torch.Tensor:
    """(m + 1, N, N) int64, level first: hist[v, t, s] = #classes in which t has exactly v positive flips over s
    (m = largest class). Everything `class_stats` needs, without holding the (N, N, K) per-class counts.

    Per chunk of classes, the counts (k, N, N) are read once, pair-major, into a (pairs, levels) table by one
    scatter-add along its rows (each pair's row is a few hundred bytes: cache-resident, parallel over pairs)."""
    N, n = correct.shape
    m = int(torch.bincount(labels.long(), minlength=num_classes).max()) if n else 0
    V, P = m + 1, N * N
    hdt = torch.int32 if num_classes < (1 << 31) else torch.long
    hist = torch.zeros((P, V), dtype=hdt, device=correct.device)
    one = torch.ones((1, 1), dtype=hdt, device=correct.device)
    for k0, k1, c in _class_chunks(correct, labels, num_classes, class_chunk):
        idx = c.view(k1 - k0, P).T.to(torch.long)  # (pairs, classes) view of exact integer counts
        hist.scatter_add_(1, idx, one.expand(P, k1 - k0))
    return hist.T.long().reshape(V, N, N)


def histogram_of_counts(per_class: torch.Tensor, max_count: Optional[int] = None) -> torch.Tensor:
    """(m + 1, N, N) histogram (level first) over the last axis of non-negative integer counts (N, N, K)."""
    N1, N2, K = per_class.shape
    m = int(per_class.max()) if max_count is None and per_class.numel() else int(max_count or 0)
    V, P = m + 1, N1 * N2
    base = torch.arange(P, device=per_class.device).view(N1, N2, 1)
    idx = (per_class.long() * P + base).flatten()
    return torch.bincount(idx, minlength=P * V).view(V, N1, N2)


def stats_from_histogram(hist: torch.Tensor, num_classes: int, ps: Sequence[float] = CONCENTRATION_PS
                         ) -> Dict[str, torch.Tensor]:
    """Mean, std (population) and entropy over classes of the counts, and for each p the fewest classes
    (largest first) that hold p% of them (0 where there are none), from the level-first (V, ...) histogram.
    Matches `flips.per_class_flips` / `flips.class_concentration` pair by pair."""
    h = hist.double()
    V = h.shape[0]
    v = torch.arange(V, dtype=torch.float64, device=h.device).view(V, *([1] * (h.ndim - 1)))
    hv = h * v
    tot = hv.sum(0)
    mean = tot / num_classes
    var = ((hv * v).sum(0) / num_classes - mean * mean).clamp_min(0.0)
    safe = tot.clamp_min(1.0)
    ent = torch.where(tot > 0, torch.log(safe) - (h * torch.xlogy(v, v)).sum(0) / safe, torch.zeros_like(tot))
    out = {"mean": mean, "std": var.sqrt(), "entropy": ent.clamp_min(0.0), "total": tot}
    # classes with count >= v, and their flips, for every level v (one zero level appended for v = V)
    # suffix sums as total - prefix + own level (exact: integer values in float64)
    zero = torch.zeros_like(h[:1])
    cnt_ge = torch.cat([h.sum(0, keepdim=True) - torch.cumsum(h, 0) + h, zero], 0)
    sum_ge = torch.cat([tot.unsqueeze(0) - torch.cumsum(hv, 0) + hv, zero], 0)
    for p in ps:
        thr = tot * (p / 100.0) - 1e-9
        vstar = ((sum_ge[:V] >= thr).sum(0) - 1).clamp(min=0)  # the largest level whose classes reach thr
        above = (vstar + 1).unsqueeze(0)
        s_above = sum_ge.gather(0, above).squeeze(0)
        c_above = cnt_ge.gather(0, above).squeeze(0)
        need = (c_above + torch.ceil((thr - s_above) / vstar.clamp(min=1).double())).round().long()
        out[f"classes_for_{p:g}pct"] = torch.where(tot > 0, need, torch.zeros_like(need))
    return out


def class_stats(per_class: torch.Tensor, ps: Sequence[float] = CONCENTRATION_PS, row_chunk: int = 16
                ) -> Dict[str, torch.Tensor]:
    """Per-pair statistics of (N, N, K) per-class counts (see `stats_from_histogram`). Small counts go through
    their histogram; counts larger than the class count (few, large classes) through a sort, in row chunks."""
    N1, N2, K = per_class.shape
    if per_class.numel() == 0 or int(per_class.max()) + 1 <= 2 * K:
        return stats_from_histogram(histogram_of_counts(per_class), K, ps)
    out: Dict[str, torch.Tensor] = {}
    for r0 in range(0, N1, row_chunk):
        c = per_class[r0:r0 + row_chunk].double()
        part = {"mean": c.mean(-1), "std": c.std(-1, unbiased=False) if K > 1 else torch.zeros_like(c[..., 0]),
                "entropy": entropy_of_counts(c, -1)}
        cum = torch.cumsum(torch.sort(c, -1, descending=True).values, -1)
        tot = cum[..., -1]
        for p in ps:
            need = (cum < (tot * (p / 100.0) - 1e-9).unsqueeze(-1)).sum(-1) + 1
            part[f"classes_for_{p:g}pct"] = torch.where(tot > 0, need, torch.zeros_like(need))
        for k, v in part.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v, 0) for k, v in out.items()}


def gram(m: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """m @ m.T (symmetric) from the row blocks on and above the diagonal only: (blocks + 1) / (2 blocks) of
    the multiply-adds of one matmul."""
    N = m.shape[0]
    if N < 2 * blocks:
        return m @ m.T
    out = torch.empty((N, N), dtype=m.dtype, device=m.device)
    edges = [N * i // blocks for i in range(blocks + 1)]
    for i in range(blocks):
        a0, a1 = edges[i], edges[i + 1]
        part = m[a0:a1] @ m[a0:].T  # (rows of block i) x (columns of blocks i..)
        out[a0:a1, a0:] = part
        out[a1:, a0:a1] = part[:, a1 - a0:].T
    return out


def _majority(preds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(n,) per sample, a class that most of its valid model predictions share when one holds a majority (the
    Boyer-Moore vote over models, vectorised over samples; any class otherwise, which is still correct below)."""
    N, n = preds.shape
    cand = torch.full((n,), -1, dtype=preds.dtype, device=preds.device)
    cnt = torch.zeros(n, dtype=torch.int32, device=preds.device)
    for a in range(N):
        x, v = preds[a], valid[a]
        cand = torch.where(v & (cnt == 0), x, cand)
        cnt += (v & (x == cand)).int() * 2 - v.int()  # +1 same, -1 different, 0 invalid
    return cand


def _group_gram(key: torch.Tensor, model: torch.Tensor, N: int, small_group: int, col_chunk: int
                ) -> torch.Tensor:
    """(N, N) int64: #groups holding both a and b, where a group is a run of equal `key` (sorted) and `model`
    the member of each entry. Large groups become 0/1 columns of a matmul (chunked), small ones add their pairs."""
    dev = key.device
    L = key.numel()
    out = torch.zeros((N, N), dtype=torch.long, device=dev)
    if L == 0:
        return out
    new = torch.ones(L, dtype=torch.bool, device=dev)
    new[1:] = key[1:] != key[:-1]
    starts = torch.nonzero(new).flatten()
    lengths = torch.diff(starts, append=torch.tensor([L], device=dev))
    run = torch.cumsum(new, 0) - 1  # group id of every entry
    run_len = lengths[run]
    # small groups (2 <= size <= small_group): pairs at offsets o = 1 .. small_group - 1 inside the group
    small = (run_len >= 2) & (run_len <= small_group)
    if bool(small.any()):
        j = torch.nonzero(small).flatten()
        left = run_len[j] - (j - starts[run[j]]) - 1  # members after this one in its group
        pairs = torch.zeros(N * N, dtype=torch.long, device=dev)
        for o in range(1, small_group):
            keep = left >= o
            j, left = j[keep], left[keep]
            if j.numel() == 0:
                break
            pairs += torch.bincount(model[j] * N + model[j + o], minlength=N * N)
        pairs = pairs.view(N, N)
        out += pairs + pairs.T
    # large groups: dense membership columns, M @ M^T
    big_run = lengths > small_group
    G = int(big_run.sum())
    if G:
        gid_of_run = torch.cumsum(big_run, 0) - 1
        keep = big_run[run]
        gid, mem = gid_of_run[run[keep]], model[keep]  # gid is sorted
        bounds = torch.searchsorted(gid, torch.arange(0, G + col_chunk, col_chunk, device=dev))
        fdt = _exact_float(L)
        acc = torch.zeros((N, N), dtype=fdt, device=dev)
        for j, g0 in enumerate(range(0, G, col_chunk)):
            a, b = int(bounds[j]), int(bounds[j + 1])
            M = torch.zeros((N, min(G, g0 + col_chunk) - g0), dtype=fdt, device=dev)
            M[mem[a:b], gid[a:b] - g0] = 1.0
            acc += gram(M)
        out += torch.round(acc).long()
    return out


def agreement_counts(preds: torch.Tensor, small_group: int = 16, col_chunk: int = 1 << 15,
                     labels: Optional[torch.Tensor] = None, right_gram: Optional[torch.Tensor] = None,
                     dense_layers: int = 2) -> torch.Tensor:
    """(N, N) int64: #samples on which models a and b predict the same class (symmetric; diagonal = n).

    Layers of dense columns first: per sample, a reference class (the label if given, else the majority vote
    of the models; then the majority of the predictions left, e.g. a shared confusion); the models predicting it
    form a 0/1 (N, n) matrix M and add M @ M^T (for the label: `right_gram`, #both right = right[a] - pos flips,
    when the caller has it). The few predictions left over group by (sample, class) with one 1-D sort and add
    their pairs (`_group_gram`). Exact whatever the references; no loop over model pairs."""
    N, n = preds.shape
    dev = preds.device
    out = torch.zeros((N, N), dtype=torch.long, device=dev)
    if N == 0 or n == 0:
        return out
    fdt = _exact_float(n)
    left = torch.ones((N, n), dtype=torch.bool, device=dev)
    for layer in range(dense_layers):
        if layer == 0 and labels is not None:
            ref = labels.to(dev, preds.dtype)
        else:
            ref = _majority(preds, left)
        member = left & (preds == ref.view(1, n))
        if layer == 0 and labels is not None and right_gram is not None:
            out += right_gram.to(dev).long()
        else:
            out += torch.round(gram(member.to(fdt))).long()
        left &= ~member
    # what is left: group by (sample, class), one sort
    i, a = torch.nonzero(left.T, as_tuple=True)  # sample-major, models ascending
    if i.numel():
        key = i * (int(preds.max()) + 1) + preds[a, i].long()
        key, perm = torch.sort(key, stable=True)
        out += _group_gram(key, a[perm], N, small_group, col_chunk)
    out.fill_diagonal_(n)
    return out


def _log_probs(chunk: torch.Tensor, T: float) -> torch.Tensor:
    return torch.log_softmax(chunk.float() / T, dim=-1)


def kl_matrix(logits, T: float = 1.0, sample_chunk: Optional[int] = None, max_elems: int = 1 << 26
              ) -> torch.Tensor:
    """(N, N) float64 mean predictive KL(p_t || p_s) over samples, at temperature T.

    `logits`: a (N, n, K) tensor, or an iterable of (N, b, K) chunks (so callers can stream logits that do not
    fit in memory). Per chunk: KL_sum[t, s] += sum_i sum_k p_t log p_t - (p_t flattened) @ (log p_s flattened)^T.
    """
    if isinstance(logits, torch.Tensor):
        N, n, K = logits.shape
        b = sample_chunk or max(1, max_elems // max(1, N * K))
        chunks: Iterable[torch.Tensor] = (logits[:, i:i + b] for i in range(0, n, b))
    else:
        chunks = logits
    total, count = None, 0
    for z in chunks:
        N, b, K = z.shape
        lp = _log_probs(z, T)
        p = lp.exp()
        neg_ent = (p * lp).sum((1, 2)).double()  # (N,)
        cross = (p.reshape(N, b * K) @ lp.reshape(N, b * K).T).double()  # (N, N): sum_i p_t . log p_s
        part = neg_ent[:, None] - cross
        total = part if total is None else total + part
        count += b
    if total is None:
        raise ValueError("kl_matrix got no samples")
    kl = total / count
    kl.fill_diagonal_(0.0)
    return kl.clamp_min(0.0)


def kl_matrix_stream(log_probs: Sequence, max_bytes: int = 1 << 30, device=None, model_block: int = 64,
                     progress: Optional[bool] = None) -> torch.Tensor:
    """(N, N) float64 mean KL(p_t || p_s) over samples from per-model log-probabilities that stay on disk.

    `log_probs`: N array-likes of shape (n, K) (fp16 numpy memory maps, see `engine.cache.log_prob_file`; any
    tensor/array slices too), already at the wanted temperature. Streamed in blocks of samples: all N models'
    rows of a block are copied into one fp16 buffer (pinned when `device` is CUDA), moved to `device`, converted
    to float32 and reduced with KL_sum[t, s] += sum p_t log p_t - (p_t block) @ (log p_s block)^T, the
    probabilities formed `model_block` models at a time. Peak memory about `max_bytes` (the fp16 buffer, the
    float32 log-probabilities and one block of probabilities). A tqdm bar shows the blocks on a TTY (progress=None)."""
    import sys

    N = len(log_probs)
    if N == 0:
        raise ValueError("kl_matrix_stream got no models")
    n, K = log_probs[0].shape
    if any(tuple(lp.shape) != (n, K) for lp in log_probs):
        raise ValueError(f"kl_matrix_stream: every model needs ({n}, {K}) log-probabilities")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    mb = max(1, min(model_block, N))
    per_sample = N * K * (2 + 4) + mb * K * 4  # fp16 buffer + float32 log-probs + a block of probabilities
    b = int(max(1, min(n, max_bytes // per_sample)))
    buf = torch.empty((N, b, K), dtype=torch.float16, pin_memory=dev.type == "cuda")
    buf_np = buf.numpy()
    total = torch.zeros((N, N), dtype=torch.float64, device=dev)
    starts = range(0, n, b)
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"KL {N}x{N} pairs, {n} samples", unit="block", leave=False)
    copied = None  # CUDA: the event after the last host -> device copy out of `buf`
    for i0 in starts:
        bb = min(b, n - i0)
        if copied is not None:
            copied.synchronize()  # refill the pinned buffer only once its last copy has left (compute may run on)
        for m, src in enumerate(log_probs):
            if isinstance(src, torch.Tensor):
                buf[m, :bb].copy_(src[i0:i0 + bb])
            else:  # numpy / memory map: one copy from the page cache into the (pinned) buffer
                buf_np[m, :bb] = src[i0:i0 + bb]
        lp = buf[:, :bb].to(dev, non_blocking=True)
        if dev.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        lp = lp.float().reshape(N, bb * K)
        for a0 in range(0, N, mb):
            p = lp[a0:a0 + mb].exp()
            neg_ent = (p * lp[a0:a0 + mb]).sum(1).double()
            total[a0:a0 + mb] += neg_ent[:, None] - (p @ lp.T).double()
    kl = total / n
    kl.fill_diagonal_(0.0)
    return kl.clamp_min(0.0)


def pairwise_stats(preds: torch.Tensor, labels: torch.Tensor, num_classes: int, logits=None,
                   ps: Sequence[float] = CONCENTRATION_PS, T: float = 1.0, per_class: bool = True,
                   keep_per_class: bool = False) -> Dict[str, torch.Tensor]:
    """Every N x N statistic of docs/REFERENCE.md §1.1 and §5.1 from the (N, n) predicted classes (and (N, n, K)
    logits for KL).

    Keys (all [teacher, student]): pos_flips, neg_flips, pos_flips_pct, neg_flips_pct, acc_diff (teacher -
    student, %), agreement (%), pos/neg_class_{mean,std,entropy}, classes_for_{p}pct, kl (when logits are given),
    and pos_per_class (N, N, K) when `keep_per_class` (else the per-class
    statistics come from a histogram of the counts and the (N, N, K) tensor is never held). Also acc (N,) in %."""
    N, n = preds.shape
    correct = correctness(preds, labels)
    acc = accuracies(correct)
    st = None
    if per_class:
        m = int(torch.bincount(labels.long(), minlength=num_classes).max()) if n else 0
        if keep_per_class or m + 1 > 2 * num_classes:
            pc = per_class_flip_counts(correct, labels, num_classes)
            st = class_stats(pc, ps)
            pos = pc.sum(-1, dtype=torch.long)
        else:  # the histogram's total over levels is the flips count: no separate matmul
            st = stats_from_histogram(class_flip_histogram(correct, labels, num_classes), num_classes, ps)
            pos = torch.round(st["total"]).long()
    else:
        pos = flip_counts(correct)
    n_right = correct.sum(1, dtype=torch.long)
    both_right = n_right[:, None] - pos  # #(a right, b right) = #(a right) - #(a right, b wrong)
    out: Dict[str, torch.Tensor] = {
        "acc": acc,
        "pos_flips": pos,
        "neg_flips": pos.T.contiguous(),
        "pos_flips_pct": 100.0 * pos.double() / max(1, n),
        "neg_flips_pct": 100.0 * pos.T.double() / max(1, n),
        "acc_diff": acc[:, None] - acc[None, :],
        "agreement": 100.0 * agreement_counts(preds, labels=labels, right_gram=both_right).double() / max(1, n),
    }
    if st is not None:
        if keep_per_class:
            out["pos_per_class"] = pc
        for k in ("mean", "std", "entropy"):
            out[f"pos_class_{k}"] = st[k]
        for p in ps:
            out[f"classes_for_{p:g}pct"] = st[f"classes_for_{p:g}pct"]
        # negative flips per class of (t, s) are the positive flips per class of (s, t)
        for k in ("mean", "std", "entropy"):
            out[f"neg_class_{k}"] = st[k].T.contiguous()
    if logits is not None:
        out["kl"] = kl_matrix(logits, T)
    return out


def lower_envelope(x, y, bins: int = 20):
    """Minimum of y within equal-width bins of x: (bin centres, minima) for the non-empty bins (Figure 1's
    envelope of positive flips against the accuracy difference)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return torch.tensor([lo]), y.min().view(1)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(x, edges[1:-1], right=True)
    mins = torch.full((bins,), math.inf, dtype=torch.float64).scatter_reduce(0, idx, y, reduce="amin")
    centres = (edges[:-1] + edges[1:]) / 2
    keep = torch.isfinite(mins)
    return centres[keep], mins[keep]

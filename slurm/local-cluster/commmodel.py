"""dtrain's communication per step as a model: bytes, rounds, time; fitted to measured timings.

Used by linkcost.py (``--model``, ``--fit``); standard library only (matplotlib for a plot).

Per step one rank sends plus receives (dtrain's reducer counts it so, parallel/reducer.py)

    bytes(P) = 4 (P-1)/P * S_dense * b  +  min(2 (P-1) r (4 W + 8),  4 (P-1)/P * V W * b')

with S_dense = 2,352,620 floats (the CS231n LSTM's gradient but the embedding), b = 4 bytes
a float (2 with ``--reduce-dtype bf16``), r distinct words per rank's batch; the embedding
travels sparse (rows, always float32) or dense (b' = b), whichever moves fewer bytes in
float32 (dtrain's choice). A reduction of ``bytes`` over full-duplex links of bandwidth B,
sending half and receiving half at once, with a latency L per ring round, takes

    T_comm(P) = bytes(P) / 2B + rounds(P) L

rounds: 2 log2 P per large Allreduce call (MPICH's reduce-scatter + allgather), 2(P-1) for
the bf16 transport (an Alltoallv and an Allgatherv), P-1 for each of the embedding's two
Allgatherv calls (ids, rows; a ring), log2 P for the small Allgather of row counts and losses. With
``--overlap-reduce`` W_vocab's and b_vocab's part (515,052 floats, sent in float32) is in
flight while BPTT runs, and costs nothing where its transfer fits in that window (taken as
half the step's compute); in dense embedding mode the rest then takes two calls (the
prefix and W_embed's block), one more Allreduce's rounds. A step is compute, then the
exposed reduction: T = T_compute + T_comm.
"""

from __future__ import annotations

import math

DENSE_FLOATS = 512 * 512 + 512 + 256 * 2048 + 512 * 2048 + 2048 + 512 * 1004 + 1004
VOCAB_FLOATS = 512 * 1004 + 1004  # W_vocab and b_vocab: final before BPTT
VOCAB, WORDVEC = 1004, 256
ROWS_PER_RANK = 232  # distinct words in a rank's N=128 batch of the built-in data (measured)
BPTT_SHARE = 0.5  # of the step's compute between W_vocab's gradient and the reduction (assumed)
VARIANTS = {"fp32": (4, False), "overlap": (4, True), "bf16": (2, False),
            "bf16+overlap": (2, True)}


def embed_mode(p: int, rows: int = ROWS_PER_RANK) -> str:
    ring = (p - 1) / p
    sparse = 2 * ring * p * rows * (4 * WORDVEC + 8)
    return "sparse" if sparse < 4 * ring * VOCAB * WORDVEC * 4 else "dense"


def step_bytes(p: int, variant: str = "fp32", rows: int = ROWS_PER_RANK) -> dict:
    """Bytes one rank sends plus receives per step: total, and the part in flight during BPTT."""
    if p < 2:
        return {"bytes": 0.0, "early": 0.0, "embed": "local"}
    b, overlap = VARIANTS[variant]
    ring = 4 * (p - 1) / p
    mode = embed_mode(p, rows)
    embed = (2 * (p - 1) * rows * (4 * WORDVEC + 8) if mode == "sparse"
             else ring * VOCAB * WORDVEC * b)
    early = ring * VOCAB_FLOATS * 4 if overlap else 0.0  # the early part travels as float32
    dense = ring * (DENSE_FLOATS - (VOCAB_FLOATS if overlap else 0)) * b
    return {"bytes": dense + early + embed, "early": early, "embed": mode}


def allreduce_rounds(p: int, variant: str = "fp32") -> int:
    """Rounds of one large Allreduce: MPICH's reduce-scatter + allgather (recursive halving
    and doubling) takes 2 log2 P; the bf16 transport's Alltoallv and Allgatherv, P-1 each."""
    if VARIANTS[variant][0] == 2:
        return 2 * (p - 1)
    return 2 * max(1, math.ceil(math.log2(p)))


def rounds(p: int, variant: str = "fp32") -> int:
    """Latency-bound rounds on the step's critical path, the early part's excluded: the
    dense Allreduce (two calls with the early part out of a dense embedding's buffer), the
    embedding's two Allgatherv calls when sparse (a ring: P-1 each), the small Allgather."""
    if p < 2:
        return 0
    overlap = VARIANTS[variant][1]
    mode = embed_mode(p)
    calls = 1 + (1 if overlap and mode == "dense" else 0)
    gathers = 2 * (p - 1) if mode == "sparse" else 0
    return allreduce_rounds(p, variant) * calls + gathers + max(1, math.ceil(math.log2(p)))


def comm_seconds(p, bandwidth_Bps, latency_s, variant="fp32", compute_s=None) -> float:
    """Exposed communication per step (the early part hidden when it fits in BPTT)."""
    if p < 2:
        return 0.0
    nb = step_bytes(p, variant)
    early_s = nb["early"] / 2 / bandwidth_Bps + allreduce_rounds(p) * latency_s
    window = BPTT_SHARE * compute_s if compute_s is not None else 0.0
    rest = (nb["bytes"] - nb["early"]) / 2 / bandwidth_Bps + rounds(p, variant) * latency_s
    if nb["early"] and early_s > window:
        return rest + early_s - window  # what does not fit in BPTT shows
    return rest


def step_model(p, bandwidth_Bps, latency_s, compute_s, variant="fp32") -> dict:
    comm = comm_seconds(p, bandwidth_Bps, latency_s, variant, compute_s)
    return {"comm_s": comm, "step_s": compute_s + comm, "share": comm / (compute_s + comm)}


# ---------------------------------------------------------------------- the fit
def link_bandwidth(link: str) -> float:
    """The rate a link setting of linkcost.py gives (tbf), bytes/s; inf unshaped."""
    rate = link.partition("+")[0]
    if rate == "none":
        return float("inf")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}[rate[-4]]
    return float(rate[:-4]) * scale / 8


def fit_link(points, bandwidth=None) -> dict:
    """Least squares of T = x / 2B + n L over ``points`` [(bytes x, rounds n, seconds T)]:
    B in bytes/s, L in s, residuals in s. No intercept: no bytes, no rounds, no time.

    With ``bandwidth`` B is that (the link's rate) and L alone is fitted. Else both, with
    B > 0 and L >= 0 (where the free solution breaks one, the other is fitted alone)."""
    if bandwidth is not None:
        inv_b = 1 / bandwidth
        lat = (sum(n * (t - x / 2 * inv_b) for x, n, t in points)
               / sum(n * n for _, n, _ in points))
        resid = [t - (x / 2 * inv_b + n * lat) for x, n, t in points]
        return {"B": bandwidth, "L": lat, "residuals": resid}
    sxx = sum(x * x / 4 for x, _, _ in points)
    snn = sum(n * n for _, n, _ in points)
    sxn = sum(x / 2 * n for x, n, _ in points)
    sxt = sum(x / 2 * t for x, _, t in points)
    snt = sum(n * t for _, n, t in points)
    det = sxx * snn - sxn * sxn
    inv_b = (sxt * snn - snt * sxn) / det if det else -1.0
    lat = (sxx * snt - sxn * sxt) / det if det else -1.0
    if lat < 0 or inv_b <= 0:
        fit_b = (sxt / sxx, 0.0)  # bandwidth alone
        fit_l = (0.0, snt / snn)  # latency alone
        inv_b, lat = min((fit_b, fit_l), key=lambda f: sum(
            (t - x / 2 * f[0] - n * f[1]) ** 2 for x, n, t in points))
    resid = [t - (x / 2 * inv_b + n * lat) for x, n, t in points]
    return {"B": 1 / inv_b if inv_b > 0 else float("inf"), "L": lat, "residuals": resid}


def fit_records(records, variant="fp32", fixed_bandwidth=True, cores=2) -> dict:
    """Per link setting, the fit over reduce-only records (1 rank per host) of ``variant``:
    L alone with B the link's rate (``fixed_bandwidth``), else both.

    On one machine the hosts' ranks share its ``cores``: a round's work (the TCP stack's
    copies, MPI's progress) then takes max(1, P / cores) times as long, so the rounds are
    weighted so in the fit. A cluster's node has its own cores: the projection does not."""
    by_link: dict[str, list] = {}
    for r in records:
        if r.get("reduce_only") and r.get("ppn") == 1 and (r.get("variant") or "fp32") == variant:
            by_link.setdefault(r["link"], []).append(
                (r["est_bytes"], rounds(r["ranks"], variant) * max(1.0, r["ranks"] / cores),
                 r["ms"] / 1e3, r["ranks"]))
    out = {}
    for link, pts in by_link.items():
        f = fit_link([p[:3] for p in pts], link_bandwidth(link) if fixed_bandwidth else None)
        f["points"] = pts
        out[link] = f
    return out


def projection_table(compute_s, links, ps=(2, 3, 4, 8, 32, 128), variants=tuple(VARIANTS)):
    """Markdown rows: ms/step (communication share) per link, variant and P."""
    rows = ["| link | variant | " + " | ".join(f"P={p}" for p in ps) + " |",
            "|---|---|" + "---|" * len(ps)]
    for name, bw, lat in links:
        for v in variants:
            cells = []
            for p in ps:
                m = step_model(p, bw, lat, compute_s, v)
                cells.append(f"{1e3 * m['step_s']:.1f} ({100 * m['share']:.0f}%)")
            rows.append(f"| {name} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(path, compute_s, links, fits=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if fits:
        for link, f in fits.items():
            pts = sorted(f["points"], key=lambda q: q[3])
            color = ax.plot([q[3] for q in pts], [1e3 * q[2] for q in pts], "o", alpha=0.6,
                            label=f"{link}: measured")[0].get_color()
            grid = sorted({q[3] for q in pts})
            ax.plot(grid, [1e3 * comm_seconds(p, f["B"], f["L"] * max(1.0, p / 2)) for p in grid],
                    "-", color=color, label=f"{link}: fit")
        ax.set_yscale("log")
        ax.set_xlabel("hosts (1 rank each)")
        ax.set_ylabel("reduction, ms (median of 20)")
        ax.set_title("fit on the namespace hosts (2 shared cores)", fontsize=9)
        ax.legend(fontsize=6)
    ax = axes[1]
    grid = [2 ** k for k in range(1, 8)]
    for name, bw, lat in links:
        for v in VARIANTS:
            ax.plot(grid, [100 * step_model(p, bw, lat, compute_s, v)["share"] for p in grid],
                    marker="o", ms=3, label=f"{name}; {v}")
    ax.axhline(15, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("nodes (1 rank each)")
    ax.set_ylabel("communication share of the step, %")
    ax.set_title(f"projection, compute {1e3 * compute_s:.0f} ms/step (N=128)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

"""TCA-Attention's offline step: one head budget per (layer, KV head) from one pass over calibration text.

Candidates are the paper's log-Gaussian configurations over the per-block budgets K = {1, 2, 4, ..., b}
(`p_k` proportional to `exp(-(log2 k - mu)^2 / (2 sigma^2))` on a mu/sigma grid), plus "keep everything".
For each head the online rule is simulated on the captured q/k: blocks ranked by redundancy, the most
redundant `p_1` share keeping 1 token, the next `p_2` keeping 2, ...; each query in the text's second half
sees its group's kept tokens of blocks behind its local window and every token inside it. The error is the
attention mass a query loses to dropped tokens (the calibration sees no V), averaged over the group's query
heads; the head keeps the sparsest candidate within `tolerance`. The chosen shares become redundancy
thresholds (quantiles of the head's calibration blocks), so online a block's budget is set once, when it
completes, by comparing its redundancy with them.
"""

from __future__ import annotations

import math

import torch

MU_STEPS = 9
SIGMAS = (0.5, 1.0, 2.0)
EVAL_STRIDE = 4  # every 4th query of the second half is scored


def candidates(block: int) -> torch.Tensor:
    """`[M, m]` shares of blocks keeping 1, 2, 4, ..., `block` tokens; row 0 keeps everything."""
    logk = torch.arange(int(math.log2(block)) + 1, dtype=torch.float64)
    rows = [torch.nn.functional.one_hot(torch.tensor(len(logk) - 1), len(logk)).double()]
    for mu in torch.linspace(0, float(logk[-1]), MU_STEPS):
        for sigma in SIGMAS:
            p = torch.exp(-((logk - mu) ** 2) / (2 * sigma**2))
            rows.append(p / p.sum())
    return torch.stack(rows)


def block_attention(probe: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Each block's probe queries `[H_kv, G, N, D]` over its keys `[N, P, H_kv, D]` -> `[H_kv, N, P]`, the
    softmax averaged over the group's heads."""
    return (torch.einsum("hgnd,nphd->hgnp", probe, keys) * scale).softmax(-1).mean(1)


def redundancy(a: torch.Tensor) -> torch.Tensor:
    """1 - H(a) / log b: 1 when one token takes all the attention, 0 when it is spread evenly."""
    entropy = -(a * a.clamp_min(1e-30).log()).sum(-1)
    return 1 - entropy / math.log(a.shape[-1])


def budget_class(red: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Class c (budget 2**c tokens) of blocks by redundancy: how many (descending) thresholds lie above it."""
    return (red.unsqueeze(-1) < thresholds).sum(-1)


class TCACalibrator:
    def __init__(self, block: int, local_blocks: int, tolerance: float) -> None:
        self.block, self.local_blocks, self.tolerance = block, local_blocks, tolerance
        self.cands = candidates(block)
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        b = self.block
        hq, t, d = q.shape
        hkv = k.shape[0]
        g, nb = hq // hkv, t // b
        q, k = q[:, : nb * b].double().cpu(), k[:, : nb * b].double().cpu()
        scale = d**-0.5
        probe = q.view(hkv, g, nb, b, d)[:, :, :, -1]  # each block's last query
        a = block_attention(probe, k.view(hkv, nb, b, d).permute(1, 2, 0, 3), scale)  # [H_kv, nb, b]
        red = redundancy(a)  # [H_kv, nb]
        token_rank = a.argsort(-1, descending=True).argsort(-1).flatten(1)  # [H_kv, T]
        qpos = torch.arange(nb * b // 2, nb * b, EVAL_STRIDE)
        kpos = torch.arange(nb * b)
        probs = ((q.view(hkv, g, -1, d)[:, :, qpos] @ k.transpose(1, 2).unsqueeze(1)) * scale).masked_fill(
            kpos > qpos[:, None], float("-inf")).softmax(-1)  # [H_kv, G, E, T]
        frontier = ((qpos - 1) // b - self.local_blocks + 1).clamp_min(0) * b
        behind = kpos < frontier[:, None]  # [E, T]: tokens the query sees only if kept
        order = red.argsort(-1, descending=True).argsort(-1)  # each block's redundancy rank
        out = {name: [] for name in ("thresholds", "proportions", "keep_ratio", "lost_mass")}
        for h in range(hkv):
            best = None
            for p in sorted(self.cands, key=lambda p: float((p * 2 ** torch.arange(len(p))).sum())):
                cum = p.cumsum(0)
                cls = torch.searchsorted(cum, (order[h].double() + 0.5) / nb).clamp_max(len(p) - 1)
                kept = token_rank[h] < (2 ** cls).repeat_interleave(b)
                lost = (probs[h] * (behind & ~kept)).sum(-1).mean()
                if lost <= self.tolerance:
                    best = (p, cum, kept, lost)
                    break
            p, cum, kept, lost = best  # "keep everything" loses nothing, so some candidate always fits
            q_at = (1 - cum[:-1]).clamp(0, 1)
            thr = torch.where(cum[:-1] > 0, torch.quantile(red[h], q_at), torch.tensor(float("inf")))
            out["thresholds"].append(thr)
            out["proportions"].append(p)
            out["keep_ratio"].append(kept.double().mean())
            out["lost_mass"].append(lost)
        self.layers[layer] = {name: torch.stack(v).float() for name, v in out.items()}

    def result(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack([self.layers[i][name] for i in sorted(self.layers)])
                for name in ("thresholds", "proportions", "keep_ratio", "lost_mass")}

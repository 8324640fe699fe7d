"""Batched sampler: allowed tokens, logit bias, penalties, temperature, top-k / top-p / min-p, per-request seeded
draws, logprobs.

A random draw inverts its row's cumulative distribution at one uniform number from the request's own generator, so a
seeded request samples the same tokens whatever else shares its batch. One number a row: the exponential race
(argmax of p / E, E ~ Exp(1), what vLLM's GPU samplers run) needs one a vocabulary entry, and torch's
`exponential_` draws those at ~0.7 ms for this model's 49k vocabulary, ~10% of a 4-sequence decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.sequence import Sequence

_BLOCK = 1024  # tokens a block of `invert_cdf` (at most; a divisor of the vocabulary)


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # the `logprobs` most likely tokens, best first


def invert_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` `[n, V]` (any non-negative mass), the token whose cumulative interval holds `uniforms` `[n]`
    (float32, in [0, 1)) times the row's total mass. A token of probability 0 has an empty interval and is never
    returned; a float32 below 1 times the total rounds to less than the total, so some token's interval holds every
    target. In two levels, as torch's cumulative sum runs one element at a time (~3 ms for 64 rows of a 49k
    vocabulary): the rows' masses summed in blocks, the block that holds the target found among their running sums,
    then the token within that block alone."""
    n, vocab = probs.shape
    width = math.gcd(vocab, _BLOCK)
    blocks = probs.reshape(n, vocab // width, width)
    mass = blocks.sum(dim=-1)
    cum = mass.cumsum(dim=-1)
    total = cum[:, -1:]
    if not torch.isfinite(total).all():  # NaN would draw a token past the vocabulary
        raise ValueError("sampling probabilities are not finite: the model's logits hold NaN or infinity")
    target = uniforms.unsqueeze(1) * total
    block = torch.searchsorted(cum, target, right=True)  # its running sum passes the target: its mass is not 0
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp_(min=0)), 0.0)
    inner = blocks[torch.arange(n), block.flatten()]
    token = torch.searchsorted(inner.cumsum(dim=-1), target - before, right=True)
    # The block's own sums may round below the target that its mass passed: then its last token of mass > 0.
    last = width - 1 - (inner.flip(-1) > 0).to(torch.uint8).argmax(dim=-1, keepdim=True)
    return (block * width + torch.minimum(token, last)).flatten()


class Sampler:
    def __init__(self, eos_token_ids: set[int], seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator().manual_seed(seed)  # for requests without a seed

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        logits = logits.float().cpu()  # sampling is per-request Python work; the CPU does it either way
        raw = logits  # what the logprobs report
        adjusted = [i for i, seq in enumerate(seqs) if self._adjusts(seq)]
        if adjusted:
            logits = logits.clone()
            for i in adjusted:
                self._adjust(logits[i], seqs[i])
        tokens = torch.empty(len(seqs), dtype=torch.long)
        greedy = torch.tensor([s.sampling.greedy for s in seqs])
        if greedy.any():
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        rand = (~greedy).nonzero().flatten().tolist()
        if rand:
            probs = self._probs(logits if len(rand) == len(seqs) else logits[rand], [seqs[i] for i in rand])
            uniforms = torch.cat([torch.rand(1, generator=seqs[i].generator or self.generator) for i in rand])
            tokens[rand] = invert_cdf(probs, uniforms)
        return tokens.tolist(), self._logprobs(raw, tokens, seqs)

    @staticmethod
    def _adjusts(seq: Sequence) -> bool:
        """Whether `_adjust` changes the sequence's row."""
        sp = seq.sampling
        return (sp.allowed_token_ids is not None or bool(sp.logit_bias) or seq.num_output_tokens < sp.min_tokens
                or sp.has_penalties)

    def _adjust(self, row: torch.Tensor, seq: Sequence) -> None:
        sp = seq.sampling
        if sp.allowed_token_ids is not None:
            allowed = torch.tensor(sp.allowed_token_ids, dtype=torch.long)
            kept = row[allowed]
            row.fill_(float("-inf"))
            row[allowed] = kept
        if sp.logit_bias:
            row[torch.tensor(list(sp.logit_bias), dtype=torch.long)] += torch.tensor(list(sp.logit_bias.values()))
        if seq.num_output_tokens < sp.min_tokens:
            banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(self.eos_token_ids))
            row[banned] = float("-inf")
        if not sp.has_penalties:
            return
        out = torch.tensor(seq.output_token_ids, dtype=torch.long)
        if sp.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
        if out.numel():
            counts = torch.bincount(out, minlength=row.numel()).to(row.dtype)
            row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Probabilities of `logits`, which stay as they are."""
        temps = torch.tensor([s.sampling.temperature for s in seqs]).unsqueeze(1)
        # A repetition penalty near 0 divides a seen token's logit past float32's range: at its largest finite value
        # such tokens share the mass, their limit, where an infinite logit would make softmax NaN.
        logits = (logits / temps).clamp_(max=torch.finfo(logits.dtype).max)
        top_k = [s.sampling.effective_top_k for s in seqs]
        top_p = [s.sampling.top_p for s in seqs]
        if any(top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            ranks = torch.arange(vocab).unsqueeze(0)
            # A top_k past the vocabulary keeps every token (and any int fits the tensor once clamped).
            k = torch.tensor([min(k, vocab) if k else vocab for k in top_k]).unsqueeze(1)
            drop = ranks >= k
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
            drop |= (cum - sorted_logits.softmax(dim=-1)) >= torch.tensor(top_p).unsqueeze(1)
            drop[:, 0] = False  # the most likely token stays: a top_p below float32's least value rounds to 0
            sorted_logits[drop] = float("-inf")
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_p = torch.tensor([s.sampling.min_p for s in seqs]).unsqueeze(1)
        if (min_p > 0).any():
            probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
        return probs

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]) -> list[TokenLogprobs | None]:
        wanted = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None]
        result: list[TokenLogprobs | None] = [None] * len(seqs)
        if not wanted:
            return result
        lp = raw[wanted].log_softmax(dim=-1)
        for row, i in enumerate(wanted):
            tok = int(tokens[i])
            chosen = lp[row, tok]
            rank = int((lp[row] > chosen).sum()) + 1
            k = seqs[i].sampling.logprobs
            top_vals, top_ids = lp[row].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
            result[i] = TokenLogprobs(tok, float(chosen), rank, list(zip(top_ids.tolist(), top_vals.tolist())))
        return result

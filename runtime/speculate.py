"""Speculative decoding: several tokens per read of the weights for one stream, with the same output.

    spec = Speculator(NgramDrafter(), max_tokens=8)           # or ModelDrafter(draft_model, context)
    Engine(..., speculator=spec)                                # runtime/engine.py uses it at batch 1

At batch 1 a decode step reads every weight for one token and runs near the machine's memory bandwidth;
reading k + 1 tokens in one prompt pass costs little more (SmolLM2 on 2 cores: 1.14x a decode step for
k = 4, 1.48x for k = 8). A drafter guesses the next k tokens; the target model reads the last token and
the k guesses in one pass over the sequence's row (the slots' prompt path), which gives its logits at
every position; the guesses are checked in order and the row's length is cut back past the first one
that is refused, so the cache holds exactly the tokens kept.

Drafters: NgramDrafter (prompt lookup: the tokens that followed the latest earlier occurrence of the
last 3, else 2, tokens of the prompt and output; no second model) and ModelDrafter (a smaller model
folder with the same tokenizer, its own one-row cache kept in step with the sequence).

Exact. Greedy: a guess is kept while it is the target's own argmax at its position, and the first
other token is the target's: the tokens are those of plain decoding, to the float rounding of the
prompt kernel against the decode kernel (the same bound as prefix reuse, runtime/prefix_cache.py;
tests/test_speculate.py checks equality over long outputs on both graph kinds). Sampled: the
rejection rule of Leviathan et al. and Chen et al.: guess x (drawn from the draft's distribution q,
or certain for an n-gram) is kept with probability min(1, p(x) / q(x)), p the target's distribution
as the sampler defines it (temperature, top-k, top-p, repetition penalty); a refused one is replaced
by a draw from max(0, p - q) renormalised, and after k kept guesses one more token is drawn from p:
every token follows p, as plain sampling's (tested with a chi-square test). The draws use the
sequence's seeded generator: a seed gives the same text every run, not plain sampling's text.

Where it applies: the engine speculates for a sequence when it is the only one decoding (batched rows
already share each weight read, and the fused graph continues a cache with several tokens only in
batch 1) and it has no grammar and no presence/frequency penalties (their state changes with every
token; logit_bias and the repetition penalty are applied per position). The portable graph
speculates too (each row is its own cache), though its rollback copies the row.

Adaptive: each sequence keeps a decayed count of guesses kept and refused; each round picks the k
that maximises the expected tokens per unit of time, E(k) = (1 - r^(k+1)) / (1 - r) over the
measured cost of a round of k (in plain decode steps, timed as the engine runs; a draft model's
catching up with tokens it has not read is left out, as a prompt pass is), and speculates only when
that beats a plain step by MARGIN. A new sequence starts from the rate of recent rounds (all
sequences'), so a drafter that keeps failing is not tried on every request. Once refusals bring r
below the margin, the sequence decodes plainly for BACKOFF steps (16, doubling on each failed return
up to 1024; a round that keeps half its guesses resets it) and then tries one guess, from the prior.
Open-ended text, which n-grams rarely match, costs only the lookup.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np

from llama2_onnx.errors import UserError

from .prefix_cache import common_prefix
from .sampler import _draw as draw
from .sampler import probs, sample

log = logging.getLogger(__name__)

DRAFT_TOKENS = 8  # guesses per round at most (--draft-tokens)
STEADY_READ = 2  # tokens a draft model reads to catch up after a round, at most, when its guesses hold
NGRAM = (3, 2)  # prompt lookup: the longest of these tail lengths that occurs earlier wins
PRIOR = (0.6, 1.0)  # (kept, tried): a new sequence's acceptance rate prior, weighted as one guess
DECAY = 0.9  # per round: older rounds count less
SEEN_DECAY = 0.98  # per round, over all sequences: a new sequence starts from the recent rounds' rate
BACKOFF = (16, 1024)  # plain steps a sequence waits before trying again once guesses stop paying: doubling
MARGIN = 1.05  # speculate when the expected tokens per unit of time beat a plain step by this much
COST_SLOPE = 0.06  # a round of k guesses costs 1 + COST_SLOPE * k plain steps until measured


class Drafter(Protocol):
    sync_s: float  # of the last draft's time, what a round's cost leaves out (a draft model catching up)

    def draft(self, seq, k: int) -> tuple[list[int], np.ndarray | None]:
        """Up to k guesses of seq's next tokens, and their draft distributions q (k, V) where they were
        drawn (None: certain guesses)."""
        ...


class NgramDrafter:
    """Prompt lookup: the tokens after the latest earlier occurrence of the sequence's last n tokens (a
    match inside a loop, overlapping the tail, is continued around the loop)."""

    sync_s = 0.0

    def __init__(self, ngram: tuple[int, ...] = NGRAM):
        self.ngram = ngram

    def draft(self, seq, k: int) -> tuple[list[int], None]:
        ids = np.asarray(seq.req.prompt + tuple(seq.tokens), np.int64)
        for n in self.ngram:
            if len(ids) <= n:
                continue
            tail = ids[-n:]
            starts = np.flatnonzero(ids[:-n] == tail[0])  # candidate starts, the tail itself excluded
            for s in starts[::-1]:  # the latest occurrence first
                if s + n < len(ids) and np.array_equal(ids[s:s + n], tail):
                    out = ids[s + n:s + n + k].tolist()
                    period = len(ids) - n - s  # a match overlapping the tail: a loop, guessed on around
                    while len(out) < k:
                        out.append(out[len(out) - period])
                    return out, None
        return [], None


class ModelDrafter:
    """A smaller model with the same tokenizer guesses greedily (or samples, for sampled sequences); its
    one-row cache follows the sequence (the common prefix kept, the rest read)."""

    def __init__(self, model, context: int, target_vocab: int):
        from .slots import make_slots

        if model.config.model.vocab_size != target_vocab:
            raise UserError(f"the draft model's vocabulary has {model.config.model.vocab_size} tokens, the target's "
                            f"{target_vocab}: a draft model needs the same tokenizer")
        self.model = model
        self.slots = make_slots(model, 1, context)
        self.chunk = model.prompt_chunk or 256
        self.sync_s = 0.0

    def draft(self, seq, k: int) -> tuple[list[int], np.ndarray | None]:
        ids = list(seq.req.prompt) + list(seq.tokens)
        slots = self.slots
        keep = common_prefix(slots.held(0), ids[:-1])
        slots.truncate(0, keep)
        room = slots.capacity - keep - 1
        k = min(k, room - (len(ids) - keep) + 1)
        if k < 1:
            return [], None
        logits, start = None, time.perf_counter()
        for a in range(keep, len(ids), self.chunk):
            logits = slots.prefill(0, ids[a:a + self.chunk])[-1]
        # catching up past what a steady round reads (the last round's kept guesses and token, which
        # also give the first guess's logits) is a prompt pass, not a round's cost
        read = len(ids) - keep
        self.sync_s = (time.perf_counter() - start) * max(0, read - STEADY_READ) / read
        out, dists = [], []
        seen = None if seq.seen is None else set(seq.seen)
        for j in range(k):
            tok, q = _choice(seq, logits, seen)
            if q is not None:
                tok = _draw(q, seq.rng)
                dists.append(q)
            out.append(tok)
            if seen is not None:
                seen.add(tok)
            if j + 1 < k:
                logits = slots.decode([0], [tok])[0]
        return out, (np.stack(dists) if dists else None)


def _choice(seq, logits: np.ndarray, seen: set[int] | None) -> tuple[int | None, np.ndarray | None]:
    """What seq's sampling makes of one position's logits (V,), seen: the ids its repetition penalty
    counts there. Greedy: (the token, None); sampled: (None, the distribution the sampler draws from)."""
    row, params = seq.adjusted(logits), seq.req.params
    prev = None if seen is None else [seen]
    if params.greedy:
        return int(sample(row[None], params, seq.rng, prev_tokens=prev)[0]), None
    return None, probs(row[None], params, prev)[0]


def _draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from weights (V,) (>= 0, some > 0): the sampler's inverse CDF."""
    return int(draw(p[None, :], rng)[0])


class SpecState:
    """One sequence's record: decayed counts of guesses kept and tried, and its back-off."""

    def __init__(self, kept: float, tried: float):
        self.kept, self.tried = kept, tried
        self.pause = 0  # plain steps left before it tries again
        self.backoff = BACKOFF[0]  # the next pause
        self.probe = False  # the first round after a pause: one guess, to see whether guesses pay again

    @property
    def rate(self) -> float:
        return min(self.kept / self.tried, 0.99)


class Speculator:
    def __init__(self, drafter: Drafter, max_tokens: int = DRAFT_TOKENS):
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise UserError(f"--draft-tokens must be at least 1, got {max_tokens!r}")
        self.drafter, self.max_tokens = drafter, max_tokens
        self.plain_s: float | None = None  # a batch-1 decode step, EMA
        self.round_s: dict[int, float] = {}  # a round of k guesses (drafting included), EMA
        self.counts = {"rounds": 0, "drafted": 0, "accepted": 0, "tokens": 0}
        self.seen = list(PRIOR)  # (kept, tried) over every sequence, decayed: where a new sequence starts
        self.failed = False  # the drafter raised: no more rounds

    def round(self, seq, slots) -> tuple[list[int], np.ndarray] | None:
        """One round for seq, decoding alone in slots: draft, read the last token and the guesses in one
        pass, keep what the rule keeps and cut the row back to it. (the tokens seq takes, the logits each
        was chosen from); None when no round pays now (or nothing was guessed): a plain step instead."""
        if self.failed or not self.eligible(seq):
            return None
        row = seq.slot
        length = int(slots.lengths[row])
        # (a pulled stream may end a round up to k tokens past its credit: it then waits, credit below 0,
        # until its reader has taken them: a paused reader costs one round at most)
        k = self.plan(seq, min(seq.budget - len(seq.tokens) - 1, slots.capacity - length - 1))
        if k < 1:
            return None
        start = time.perf_counter()
        try:
            drafts, q = self.drafter.draft(seq, k)
        except Exception:  # the draft model's failure is not the request's: decode plainly from now on
            log.exception("the drafter failed; speculative decoding is off for this engine")
            self.failed = True
            return None
        if not drafts:
            return None
        logits = slots.prefill(row, [seq.tokens[-1], *drafts], all_logits=True)  # (len(drafts) + 1, V)
        tokens = self.verify(seq, logits, drafts, q)
        slots.truncate(row, length + len(tokens))  # the last token and the kept guesses
        self.record(seq, len(drafts), len(tokens) - 1, time.perf_counter() - start - self.drafter.sync_s)
        return tokens, logits

    # ---- the plan ----------------------------------------------------------------------------------
    def eligible(self, seq) -> bool:
        """No grammar and no presence/frequency penalties: their state moves with every token taken."""
        return seq.constraint is None and seq.counts is None

    def plan(self, seq, limit: int) -> int:
        """Guesses to draft for seq this round (0: a plain step), at most limit."""
        state = seq.spec
        if state is None:  # what guesses have been worth lately, weighted as one guess
            state = seq.spec = SpecState(self.seen[0] / self.seen[1], 1.0)
        if state.pause > 0:
            return 0
        best_k, best = 0, MARGIN
        r = state.rate
        for k in range(1, min(1 if state.probe else self.max_tokens, limit) + 1):
            gain = (1 - r ** (k + 1)) / (1 - r) / self.cost(k)
            if gain > best:
                best_k, best = k, gain
        if best_k == 0 and limit >= 1:  # guesses do not pay: plain steps for a while, then one guess to see
            state.pause, state.backoff = state.backoff, min(2 * state.backoff, BACKOFF[1])
            state.kept, state.tried = PRIOR
            state.probe = True
        return best_k

    def cost(self, k: int) -> float:
        """A round of k guesses in plain decode steps (measured where it has run)."""
        if self.plain_s and k in self.round_s:
            return self.round_s[k] / self.plain_s
        return 1 + COST_SLOPE * k

    # ---- the check -----------------------------------------------------------------------------------
    def verify(self, seq, logits: np.ndarray, drafts: list[int], q: np.ndarray | None) -> list[int]:
        """The tokens seq keeps from a round: the kept guesses, then the target's own next token.
        logits (k + 1, V): the target's at each position (after the last token and each guess)."""
        out = []
        seen = None if seq.seen is None else set(seq.seen)
        for j in range(len(drafts) + 1):
            tok, p = _choice(seq, logits[j], seen)
            if p is not None and j == len(drafts):  # every guess kept: one more token from p
                tok = _draw(p, seq.rng)
            elif p is not None:
                d = drafts[j]
                qd = 1.0 if q is None else q[j][d]
                if seq.rng.random() * qd < p[d]:  # kept with probability min(1, p(d) / q(d))
                    tok = d
                else:  # refused: a draw from max(0, p - q), renormalised (q certain: p without d)
                    residual = p.copy()
                    if q is None:
                        residual[d] = 0.0
                    else:
                        residual = np.maximum(p - q[j], 0.0)
                    tok = _draw(residual, seq.rng) if residual.sum() > 0 else _draw(p, seq.rng)
            out.append(tok)
            if seen is not None:
                seen.add(tok)
            if j == len(drafts) or tok != drafts[j]:
                break
        return out

    # ---- the record ------------------------------------------------------------------------------------
    def record(self, seq, drafted: int, kept: int, seconds: float) -> None:
        """A round drafted guesses, kept of which were kept, in seconds (drafting and checking)."""
        state = seq.spec
        state.kept = state.kept * DECAY + kept
        state.tried = state.tried * DECAY + min(kept + 1, drafted)
        if 2 * kept >= drafted:  # a round that paid: the next pause, if any, starts short again
            state.backoff = BACKOFF[0]
        state.probe = False
        self.seen = [self.seen[0] * SEEN_DECAY + kept, self.seen[1] * SEEN_DECAY + min(kept + 1, drafted)]
        old = self.round_s.get(drafted)
        self.round_s[drafted] = seconds if old is None else 0.8 * old + 0.2 * seconds
        c = self.counts
        c["rounds"] += 1
        c["drafted"] += drafted
        c["accepted"] += kept
        c["tokens"] += kept + 1

    def plain(self, seq, seconds: float) -> None:
        """A plain batch-1 decode step took seconds (seq: the sequence it ran, if it may speculate)."""
        self.plain_s = seconds if self.plain_s is None else 0.9 * self.plain_s + 0.1 * seconds
        state = seq.spec
        if state is not None and state.pause > 0:
            state.pause -= 1

    def stats(self) -> dict:
        c = self.counts
        return {"spec_rounds": c["rounds"], "spec_drafted": c["drafted"], "spec_accepted": c["accepted"],
                "spec_tokens": c["tokens"]}



def make_speculator(speculative: str | None, model, context: int, draft_tokens: int = DRAFT_TOKENS,
                    **model_kwargs) -> Speculator | None:
    """--speculative: None (off), "ngram", or a draft model folder with the target's tokenizer (opened
    with model_kwargs: provider, threads, ...)."""
    if speculative is None:
        return None
    if not isinstance(draft_tokens, int) or isinstance(draft_tokens, bool) or draft_tokens < 1:
        raise UserError(f"--draft-tokens must be at least 1, got {draft_tokens!r}")
    if speculative == "ngram":
        return Speculator(NgramDrafter(), draft_tokens)
    from pathlib import Path

    from .manifest import read_manifest
    from .session import Model

    folder = Path(speculative)
    if not folder.is_dir():
        raise UserError(f"--speculative takes ngram or a draft model folder; {speculative} is neither")
    draft = Model.from_dir(folder, **model_kwargs)
    ours, theirs = read_manifest(model.folder), read_manifest(folder)
    name = model.config.tokenizer
    if draft.config.tokenizer != name or name not in theirs or ours[name].sha256 != theirs[name].sha256:
        raise UserError(f"the draft model {folder} has another tokenizer than the target's: "
                        "a draft model needs the same tokenizer (a smaller export of the same family)")
    return Speculator(ModelDrafter(draft, context, model.config.model.vocab_size), draft_tokens)

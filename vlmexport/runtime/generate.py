"""Caption decoding over any Runner (the ONNX bundle or the PyTorch reference): greedy, beam
search and sampling, with the semantics of transformers' `generate` (5.x) so that, on the
same logits, they choose the same tokens.

Ported from transformers' `_sample`, `_beam_search` and the logits processors
(NoRepeatNGram, Temperature, TopK, TopP, in that order); the comments name the steps there.
Only numpy is used, so the loop runs wherever the bundle does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vlmexport.bundle.decoding import DecodeOptions, strip_after_eos
from vlmexport.errors import UsageError
from vlmexport.runtime.runner import Runner

Processor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (ids [rows, t], scores [rows, vocab]) → scores
# transformers masks beams with this finite constant (not -inf) and the float32 arithmetic
# around it decides ties, so it is kept exactly.
NEG = np.float32(-1.0e9)


def generate(
    runner: Runner,
    prefix: np.ndarray,
    options: DecodeOptions,
    eos: int | None,
    pad: int | None,
    rng: np.random.Generator | None = None,
) -> list[list[int]]:
    """Token ids per prefix row, EOS excluded, generated from the prefix alone (distilvit).

    `eos=None` never stops early (benchmarks force exactly `max_new_tokens`). Sampling draws
    from `rng`, or from a fresh `numpy.random.default_rng(options.seed)`: fixed seed, same tokens.

    Raises:
        UsageError: `options.max_new_tokens` is unset (resolve it with `with_default_length`).
    """
    _length(options)  # raises before any graph runs
    rng = rng if rng is not None else np.random.default_rng(options.seed)
    if options.num_beams > 1:
        return beam_search(runner, prefix, options, eos, rng)
    return sample(runner, prefix, options, eos, pad, rng)


def greedy(runner: Runner, prefix: np.ndarray, max_new_tokens: int, eos: int | None, pad: int | None) -> list[list[int]]:
    """Greedy tokens per row (see `generate`); no tokens asked, none given."""
    if max_new_tokens <= 0:
        return [[] for _ in range(prefix.shape[0])]
    return generate(runner, prefix, DecodeOptions(max_new_tokens=max_new_tokens), eos, pad)


def sample(
    runner: Runner, prefix: np.ndarray, options: DecodeOptions, eos: int | None, pad: int | None, rng: np.random.Generator
) -> list[list[int]]:
    """Greedy or multinomial sampling, one token per row per step (transformers' `_sample`).

    Finished rows keep decoding with `pad` fed in, as transformers does, so every row of a
    batch gives the tokens it would give alone — for graphs without dynamic activation
    quantization (int8/uint8 share one scale across the batch; see runtime/caption.py).
    """
    processors, limit = logits_processors(options, min_tokens_to_keep=1), _length(options)
    filler = pad if pad is not None else (eos if eos is not None else 0)
    batch = prefix.shape[0]
    ids = np.zeros((batch, 0), np.int64)
    done = np.zeros(batch, dtype=bool)
    logits, past = runner.first_pass(prefix)
    for step in range(limit):
        scores = apply(processors, ids, logits[:, -1, :].astype(np.float32))
        chosen = draw(softmax(scores), rng) if options.do_sample else scores.argmax(-1)
        chosen = np.where(done, filler, chosen).astype(np.int64)
        ids = np.concatenate([ids, chosen[:, None]], axis=1)
        done |= chosen == eos
        if done.all() or step == limit - 1:
            break
        logits, past = runner.step(chosen[:, None], past)
    return [strip_after_eos(row, eos) for row in ids.tolist()]


def beam_search(runner: Runner, prefix: np.ndarray, options: DecodeOptions, eos: int | None, rng: np.random.Generator) -> list[list[int]]:
    """transformers' vectorised `_beam_search` (and beam sampling with `do_sample`), prompt length 0.

    Per image: `num_beams` running hypotheses and the `num_beams` best finished ones. Each step
    keeps the top 2·beams continuations; those that end (EOS or max length) and rank among the
    first `num_beams` become finished with score / length ** length_penalty; the best still
    running `num_beams` continue, and the KV cache is reordered to them (np.take on axis 0).
    The best finished hypothesis of each image is returned.
    """
    batch, beams, length = prefix.shape[0], options.num_beams, _length(options)
    # transformers keeps (1 + number of EOS ids, at least 2) × beams candidates and at least 2
    # tokens through top-k/top-p, so one EOS cannot leave a beam without a continuation.
    processors = logits_processors(options, min_tokens_to_keep=2)
    keep = 2 * beams
    top_beams = np.arange(keep) < beams
    running = np.zeros((batch, beams, length), np.int64)
    running_scores = np.zeros((batch, beams), np.float32)
    running_scores[:, 1:] = NEG  # only the first beam is live at the start: no duplicate hypotheses
    finished = np.zeros((batch, beams, length), np.int64)
    finished_len = np.zeros((batch, beams), np.int64)
    finished_scores = np.full((batch, beams), NEG, np.float32)
    is_finished = np.zeros((batch, beams), dtype=bool)
    improvable = np.ones((batch, 1), dtype=bool)  # transformers' is_early_stop_heuristic_unsatisfied
    # The prefix pass is the same for every beam of an image: run it once and repeat the result.
    logits, past = runner.first_pass(prefix)
    logits = np.repeat(logits, beams, axis=0)
    past = [np.repeat(p, beams, axis=0) for p in past]
    offsets = (np.arange(batch) * beams)[:, None]
    for cur in range(length):
        if cur:
            logits, past = runner.step(running[:, :, cur - 1].reshape(-1, 1), past)
        log_probs = apply(processors, running[:, :, :cur].reshape(batch * beams, cur), log_softmax(logits[:, -1, :].astype(np.float32)))
        vocab = log_probs.shape[-1]
        totals = (log_probs.reshape(batch, beams, vocab) + running_scores[:, :, None]).reshape(batch, beams * vocab)
        # c. top `keep` continuations over all beams (sampled without replacement when do_sample)
        picked = _top_continuations(totals, keep, options.do_sample, rng)
        top_scores = np.take_along_axis(totals, picked, axis=1)
        source, tokens = picked // vocab, picked % vocab
        candidates = np.take_along_axis(running, source[:, :, None], axis=1)
        candidates[:, :, cur] = tokens
        # d. which continuations end here
        ends = (tokens == eos) | (cur + 1 >= length)
        # e. the best `beams` continuations that go on
        alive = top_scores + ends.astype(np.float32) * NEG
        order = _topk(alive, beams)
        running = np.take_along_axis(candidates, order[:, :, None], axis=1)
        running_scores = np.take_along_axis(alive, order, axis=1)
        rows = np.take_along_axis(source + offsets, order, axis=1).reshape(-1)
        # f. merge the new finished hypotheses into the kept ones
        new_finished = ends & top_beams[None, :]
        scores = top_scores / np.float32((cur + 1) ** options.length_penalty)
        full = is_finished.all(-1, keepdims=True) & (options.early_stopping is True)
        scores = scores + full.astype(np.float32) * NEG
        scores = scores + (~improvable).astype(np.float32) * NEG
        scores = scores + (~new_finished).astype(np.float32) * NEG
        merged = _topk(np.concatenate([finished_scores, scores], 1), beams)
        finished = np.take_along_axis(np.concatenate([finished, candidates], 1), merged[:, :, None], axis=1)
        finished_len = np.take_along_axis(np.concatenate([finished_len, np.full_like(scores, cur + 1, np.int64)], 1), merged, axis=1)
        finished_scores = np.take_along_axis(np.concatenate([finished_scores, scores], 1), merged, axis=1)
        is_finished = np.take_along_axis(np.concatenate([is_finished, new_finished], 1), merged, axis=1)
        # g. stop when no running beam can beat the worst finished one, or nothing can go on
        improvable = improvable & _can_improve(running_scores, finished_scores, is_finished, cur + 1, length, options)
        all_full = is_finished.all() and options.early_stopping is True
        if not improvable.any() or all_full or ends.all():
            break
        past = [np.take(p, rows, axis=0) for p in past]
    best = [finished[b, 0, : finished_len[b, 0]].tolist() for b in range(batch)]
    return [strip_after_eos(tokens, eos) for tokens in best]


def _length(options: DecodeOptions) -> int:
    """`options.max_new_tokens`, which must be set.

    Raises:
        UsageError: it is unset (resolve it with `with_default_length`).
    """
    if options.max_new_tokens is None:
        raise UsageError("max_new_tokens is not set", "call options.with_default_length(model max_length) first")
    return options.max_new_tokens


def _can_improve(
    running_scores: np.ndarray, finished_scores: np.ndarray, is_finished: np.ndarray, cur_len: int, max_length: int, options: DecodeOptions
) -> np.ndarray:
    """transformers' `_check_early_stop_heuristic`: could the best running beam still beat the
    worst finished one? `early_stopping="never"` with a positive penalty assumes it grows to max length."""
    penalty = options.length_penalty
    hypothetical = max_length if options.early_stopping == "never" and penalty > 0 else cur_len
    best_running = running_scores[:, :1] / np.float32(hypothetical**penalty)
    worst_finished = np.where(is_finished, finished_scores.min(1, keepdims=True), NEG)
    return np.asarray((best_running > worst_finished).any(-1, keepdims=True))


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (ties: lower index first)."""
    if scores.shape[-1] <= 4 * k:
        return np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    # Over beams × vocabulary a full sort costs more than a decode step's bookkeeping should:
    # sort only the entries ≥ the k-th largest (every tie included, so the order is the same).
    out = np.empty((scores.shape[0], k), np.int64)
    for row, values in enumerate(scores):
        candidates = np.flatnonzero(values >= np.partition(values, -k)[-k])
        out[row] = candidates[np.argsort(-values[candidates], kind="stable")[:k]]
    return out


def _top_continuations(totals: np.ndarray, keep: int, do_sample: bool, rng: np.random.Generator) -> np.ndarray:
    if not do_sample:
        return _topk(totals, keep)
    # Gumbel-top-k draws `keep` items without replacement with softmax(totals) probabilities
    # (what torch.multinomial(..., replacement=False) does); then ordered by score as transformers does.
    picked = _topk(totals + rng.gumbel(size=totals.shape).astype(np.float32), keep)
    return np.take_along_axis(picked, _topk(np.take_along_axis(totals, picked, axis=1), keep), axis=1)


def logits_processors(options: DecodeOptions, min_tokens_to_keep: int) -> list[Processor]:
    """The processors transformers' `_get_logits_processor` builds for these options, in its order;
    temperature, top-k and top-p only when sampling."""
    processors: list[Processor] = []
    if options.no_repeat_ngram_size > 0:
        processors.append(lambda ids, scores: no_repeat_ngram(ids, scores, options.no_repeat_ngram_size))
    if options.do_sample:
        if options.temperature != 1.0:
            processors.append(lambda ids, scores: scores / np.float32(options.temperature))
        if options.top_k:
            processors.append(lambda ids, scores: top_k_filter(scores, max(options.top_k, min_tokens_to_keep)))
        if options.top_p < 1.0:
            processors.append(lambda ids, scores: top_p_filter(scores, options.top_p, min_tokens_to_keep))
    return processors


def apply(processors: list[Processor], ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    for processor in processors:
        scores = processor(ids, scores)
    return scores


def no_repeat_ngram(ids: np.ndarray, scores: np.ndarray, size: int) -> np.ndarray:
    """Ban every token that would complete an n-gram already present in the row's ids."""
    rows, length = ids.shape
    if length < size:
        return scores
    out = scores.copy()
    for row in range(rows):
        seq = ids[row].tolist()
        suffix = seq[length + 1 - size :]
        banned = [seq[i + size - 1] for i in range(length - size + 1) if seq[i : i + size - 1] == suffix]
        out[row, [t for t in banned if t < scores.shape[-1]]] = -np.inf
    return out


def top_k_filter(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep scores ≥ the k-th largest (ties kept, as transformers' TopKLogitsWarper)."""
    k = min(k, scores.shape[-1])
    threshold = np.partition(scores, -k, axis=-1)[:, -k, None]
    return np.where(scores < threshold, -np.inf, scores).astype(np.float32)


def top_p_filter(scores: np.ndarray, top_p: float, min_tokens_to_keep: int) -> np.ndarray:
    """Drop the least likely tokens whose cumulative probability is ≤ 1 - top_p (TopPLogitsWarper)."""
    order = np.argsort(scores, axis=-1, kind="stable")
    ascending = np.take_along_axis(scores, order, axis=-1)
    remove = np.cumsum(softmax(ascending), axis=-1) <= np.float32(1 - top_p)
    remove[:, -min_tokens_to_keep:] = False
    out = scores.copy()
    np.put_along_axis(out, order, np.where(remove, -np.inf, ascending), axis=-1)
    return out


def log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))).astype(np.float32)


def softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max(-1, keepdims=True))
    return (exp / exp.sum(-1, keepdims=True)).astype(np.float32)


def draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from its probabilities (inverse CDF on one uniform per row)."""
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    targets = rng.random(probs.shape[0]) * cdf[:, -1]
    picks = np.array([np.searchsorted(row, t, side="right") for row, t in zip(cdf, targets)], np.int64)
    return np.minimum(picks, probs.shape[-1] - 1)

"""Caption generation over a bundle: one decoding loop for every layout and variant."""

from __future__ import annotations

import numpy as np

from vlmexport.runtime.runner import Runner


def greedy(bundle: Runner, prefix: np.ndarray, max_new_tokens: int, eos: int | None, pad: int | None) -> list[list[int]]:
    """Greedy tokens per row, prefix-only as distilvit generates; EOS excluded.

    Finished rows keep decoding with `pad` fed in (as transformers' generate does), so
    every row of a batch gives the same tokens it would give alone.
    """
    batch = prefix.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    if max_new_tokens <= 0:
        return tokens
    logits, past = bundle.first_pass(prefix)
    filler = pad if pad is not None else (eos if eos is not None else 0)
    for step in range(max_new_tokens):
        chosen = logits[:, -1, :].argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if done[row]:
                continue
            if token == eos:
                done[row] = True
            else:
                tokens[row].append(token)
        if done.all() or step == max_new_tokens - 1:
            break
        feed = np.where(done, filler, chosen).astype(np.int64)[:, None]
        logits, past = bundle.step(feed, past)
    return tokens

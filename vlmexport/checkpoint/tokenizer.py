"""Word-level tokenizers built with the tokenizers library, for the example and synthetic models."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"


def word_tokenizer(words: list[str], vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """EOS=0, PAD=1, UNK=2, then `words`, then filler tokens up to `vocab_size`."""
    vocab = [EOS, PAD, UNK, *words]
    if vocab_size is not None:
        vocab += [f"<tok{i}>" for i in range(len(vocab), vocab_size)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordLevel has no decoder of its own; WordPiece's joins tokens with spaces.
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK)

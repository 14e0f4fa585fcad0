"""Train the project's example checkpoint: coloured shapes captioned by a tiny distilvit model.

    .venv/bin/python examples/shapes/train.py --output-dir examples/shapes/model --force

The result is a real distilvit-format checkpoint (config.json, model.safetensors with
transformers-4.x key names and PEFT LoRA adapters, tokenizer files, no
preprocessor_config.json), trained the way distilvit trains:

1. a tiny Llama (grouped KV heads, tied head) is pre-trained as a plain language model on
   caption text alone, so it is a "pretrained LM" that knows the words and their order;
2. it is wrapped with LoRA, its own weights are frozen, and the vision encoder, projection and
   LoRA adapters are trained on image → caption, the projected vision features being the
   decoder's `inputs_embeds` prefix (no prompt, no BOS), the loss on caption tokens + EOS only.

Everything is seeded and the thread count fixed; the same command writes the same weights. Held-out
images (a different seed than the training pool) are written beside the model with their
true captions, and the script reports their greedy-caption accuracy with and without LoRA,
measured through the project's own loader and captioner.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from vlmexport.bundle.decoding import DecodeOptions
from vlmexport.bundle.preprocess import Preprocessor, derive_preprocessor, open_image
from vlmexport.bundle.tokenizer import decode
from vlmexport.checkpoint.config import MODEL_TYPE, VLMConfig, parse_config
from vlmexport.checkpoint.generate import generate_tokens
from vlmexport.checkpoint.load import load_checkpoint
from vlmexport.checkpoint.model import PrefixConditioningVLM, build_model
from vlmexport.checkpoint.save import save_checkpoint
from vlmexport.checkpoint.tokenizer import word_tokenizer
from vlmexport.errors import VlmExportError
from vlmexport.fsutil import atomic_output_dir, check_output_dir
from vlmexport.samples import COLORS, SHAPES, random_shape, shape_caption

HERE = Path(__file__).resolve().parent
# One thread: these tensors are too small for intra-op parallelism to pay, and on a shared
# machine two threads wait on each other at every op (measured under load: a 30-step run took
# 5 s on one thread, 88 s on two). The weights depend on the thread count, so it is fixed.
THREADS = 1
DRAW_SIZE = 64  # images are drawn at 64x64 (as the held-out PNGs are) and resized by the preprocessor

# Separate seeds: the held-out images come from their own RNG stream, so their shape
# positions, sizes and colour jitter are never those of a training image.
MODEL_SEED = 0
TRAIN_SEED = 1
HELDOUT_SEED = 2024

LM_STEPS = 300
CAPTION_STEPS = 2500
TRAIN_POOL = 15000  # ~170 images per colour/shape/background combination
HELDOUT = 32
BATCH = 64
LM_LR = 3e-3
CAPTION_LR = 2e-3  # vision encoder and projection
LORA_LR = 1e-2  # adapters start at zero (lora_B = 0) and have far fewer weights: a higher rate
MAX_GRAD_NORM = 1.0  # as transformers' Trainer (which distilvit trains with) clips by default


def build_config_dict(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """A distilvit config.json: tiny SigLIP + tiny SmolLM-style Llama (GQA, tied head) + LoRA."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return {
        "model_type": MODEL_TYPE,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        "text_config": {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            # ~1/sqrt(hidden_size), not the 0.02 tuned for 576+-wide models: with tied weights,
            # words the caption text never tells apart (circle/square/triangle occur in the
            # same contexts) would keep nearly equal output embeddings, and the frozen decoder
            # could then not name a shape however well the vision encoder sees it.
            "initializer_range": 0.1,
            "tie_word_embeddings": True,
            # SmolLM's convention: BOS and EOS are the same token.
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        },
        "projection_type": "linear",
        "mlp_hidden_dim": None,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "max_length": 12,
        "freeze_vision_encoder": False,
        "vision_unfreeze_layers": 0,
    }


def caption_words() -> list[str]:
    """Every word any caption can use, in first-seen order (deterministic)."""
    words: list[str] = []
    for color in sorted(COLORS):
        for background in sorted(COLORS):
            for shape in SHAPES:
                for word in shape_caption(color, shape, background).split():
                    if word not in words:
                        words.append(word)
    return words


@dataclass
class Pool:
    """Preprocessed images with their caption token ids (captions all have the same length)."""

    pixels: torch.Tensor  # [n, 3, H, W]
    ids: torch.Tensor  # [n, caption tokens + EOS]


def caption_ids(tokenizer: PreTrainedTokenizerFast, captions: list[str]) -> torch.Tensor:
    """Token ids + EOS per caption; every shapes caption is eight words, so no padding is needed."""
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in captions]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("captions of different lengths")
    return torch.tensor(rows, dtype=torch.long)


def make_pool(count: int, seed: int, preprocessor: Preprocessor, tokenizer: PreTrainedTokenizerFast) -> Pool:
    rng = random.Random(seed)
    images, captions = zip(*(random_shape(rng, DRAW_SIZE) for _ in range(count)), strict=True)
    pixels = torch.from_numpy(preprocessor(list(images)))
    return Pool(pixels, caption_ids(tokenizer, list(captions)))


def batches(count: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` index batches, reshuffling the pool each epoch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + batch > count:
            order, cursor = torch.randperm(count, generator=generator), 0
        yield order[cursor : cursor + batch]
        cursor += batch


def schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pretrain_language_model(config: VLMConfig, pool: Pool, steps: int, log_every: int) -> tuple[PreTrainedModel, float]:
    """Stage 1: the plain decoder (no LoRA) learns caption text as an ordinary LM (BOS-prefixed)."""
    lm = build_model(config, with_lora=False).language_model.train()
    bos = int(config.text_config["bos_token_id"])
    optimizer = torch.optim.AdamW(lm.parameters(), lr=LM_LR, weight_decay=0.0)
    scheduler = schedule(optimizer, steps)
    loss = torch.tensor(float("nan"))
    for step, index in enumerate(batches(len(pool.ids), BATCH, steps, seed=TRAIN_SEED + 1)):
        ids = pool.ids[index]
        inputs = torch.cat([torch.full((len(ids), 1), bos), ids], dim=1)
        loss = lm(input_ids=inputs, labels=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(lm.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  lm      step {step:5d}  loss {loss.item():.4f}", flush=True)
    return lm.eval(), float(loss.item())


def base_layer_key(key: str, targets: list[str]) -> str:
    """Where a plain decoder weight lives under PEFT: `language_model.base_model.model.*`,
    and a LoRA target's Linear weight moves to `...<target>.base_layer.weight`."""
    for target in targets:
        key = re.sub(rf"\.{target}\.(weight|bias)$", rf".{target}.base_layer.\1", key)
    return "language_model.base_model.model." + key


def adopt_pretrained_decoder(model: PrefixConditioningVLM, lm: PreTrainedModel) -> None:
    """Copy the stage-1 decoder into the LoRA model's base layers; every non-LoRA decoder key
    must be filled, and every stage-1 key must land on an existing key.

    Raises:
        RuntimeError: the key mapping does not match build_model(config, with_lora=True).
    """
    targets = model.config.lora_targets()
    expected = model.state_dict()
    mapped = {base_layer_key(k, targets): v for k, v in lm.state_dict().items()}
    unexpected = sorted(set(mapped) - set(expected))
    decoder_keys = {k for k in expected if k.startswith("language_model.") and ".lora_" not in k}
    missing = sorted(decoder_keys - set(mapped))
    if unexpected or missing:
        raise RuntimeError(
            f"stage-1 keys do not map onto the LoRA model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(mapped, strict=False)
    model.causal_lm.tie_weights()


def lora_parameters(model: PrefixConditioningVLM) -> list[nn.Parameter]:
    return [
        p
        for m in model.language_model.modules()
        if isinstance(m, LoraLayer)
        for n, p in m.named_parameters()
        if "lora_" in n
    ]


def train_captioner(model: PrefixConditioningVLM, pool: Pool, steps: int, log_every: int) -> float:
    """Stage 2: vision encoder + projection + LoRA learn image → caption; the base decoder is frozen."""
    for parameter in model.language_model.parameters():
        parameter.requires_grad_(False)
    lora = lora_parameters(model)
    for parameter in lora:
        parameter.requires_grad_(True)
    encoder = [*model.vision_encoder.parameters(), *model.projection.parameters()]
    trainable = encoder + lora
    groups = [{"params": encoder, "lr": CAPTION_LR}, {"params": lora, "lr": LORA_LR}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = schedule(optimizer, steps)
    embed = model.causal_lm.get_input_embeddings()
    model.train()
    loss = torch.tensor(float("nan"))
    for step, index in enumerate(batches(len(pool.ids), BATCH, steps, seed=TRAIN_SEED + 2)):
        ids = pool.ids[index]
        prefix = model.prefix_embeddings(pool.pixels[index])
        # [prefix, caption, EOS] as inputs_embeds; labels only on caption + EOS (the model
        # shifts them: the last prefix position predicts the first word, as in generation).
        embeds = torch.cat([prefix, embed(ids)], dim=1)
        labels = torch.cat([torch.full(prefix.shape[:2], -100), ids], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        loss = model.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  caption step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return float(loss.item())


def heldout_images(count: int) -> tuple[list[Image.Image], list[str]]:
    """Images and true captions from the held-out seed (never the training stream)."""
    rng = random.Random(HELDOUT_SEED)
    images, captions = zip(*(random_shape(rng, DRAW_SIZE) for _ in range(count)), strict=True)
    return list(images), list(captions)


def check_disjoint(pool: Pool, heldout: torch.Tensor) -> None:
    """No held-out image may equal a training image pixel for pixel.

    Raises:
        RuntimeError: one does (then the seeds or the drawing code have changed).
    """
    seen = {row.numpy().tobytes() for row in pool.pixels}
    clashes = sum(row.numpy().tobytes() in seen for row in heldout)
    if clashes:
        raise RuntimeError(f"{clashes} held-out image(s) also occur in the training pool")


def write_heldout(images_dir: Path, images: list[Image.Image], captions: list[str], force: bool) -> None:
    """`000.png`, `001.png`, ... and captions.json mapping each file name to its true caption."""
    with atomic_output_dir(images_dir, force) as tmp:
        for i, image in enumerate(images):
            image.save(tmp / f"{i:03d}.png")
        truth = {f"{i:03d}.png": caption for i, caption in enumerate(captions)}
        (tmp / "captions.json").write_text(json.dumps(truth, indent=2) + "\n")


def heldout_accuracy(model_dir: Path, images_dir: Path) -> tuple[float, float]:
    """Exact-match accuracy of greedy captions, with and without the LoRA adapters, through the
    project's own loader and captioner (as `vlmexport caption` would see the checkpoint)."""
    truth = json.loads((images_dir / "captions.json").read_text())
    checkpoint = load_checkpoint(model_dir)
    pixels = checkpoint.preprocessor([open_image(images_dir / name) for name in truth])
    options = DecodeOptions(max_new_tokens=checkpoint.config.max_length)

    def accuracy() -> float:
        captions = decode(
            checkpoint.tokenizer, generate_tokens(checkpoint.model, checkpoint.tokenizer, pixels, options)
        )
        return sum(c == t for c, t in zip(captions, truth.values(), strict=True)) / len(truth)

    with_lora = accuracy()
    with checkpoint.model.language_model.disable_adapter():
        without_lora = accuracy()
    return with_lora, without_lora


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=HERE / "model", help="checkpoint folder to write")
    parser.add_argument(
        "--images-dir", type=Path, default=None, help="held-out images folder (default: 'images' beside --output-dir)"
    )
    parser.add_argument("--steps", type=int, default=CAPTION_STEPS, help="image→caption steps (stage 2)")
    parser.add_argument(
        "--lm-steps",
        type=int,
        default=None,
        help=f"LM pre-training steps (stage 1; default {LM_STEPS}, at most --steps)",
    )
    parser.add_argument(
        "--pool", type=int, default=None, help=f"training images (default {TRAIN_POOL}, fewer for short runs)"
    )
    parser.add_argument("--heldout", type=int, default=HELDOUT, help="held-out images to write and evaluate")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch threads (the weights depend on it; the example uses {THREADS})",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --output-dir and --images-dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except VlmExportError as exc:  # one line, as the vlmexport CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def train(args: argparse.Namespace) -> int:
    """Both stages, save, write the held-out images, report; see the module docstring."""
    # A short run (--steps N) is a smoke test: shrink stage 1 and the image pool with it.
    lm_steps = args.lm_steps if args.lm_steps is not None else min(LM_STEPS, args.steps)
    pool_size = args.pool if args.pool is not None else min(TRAIN_POOL, max(BATCH, args.steps * BATCH))
    images_dir = args.images_dir or args.output_dir.resolve().parent / "images"
    log_every = max(1, args.steps // 10)
    for target in (args.output_dir, images_dir):
        check_output_dir(target, args.force)  # before minutes of training, not after

    torch.set_num_threads(args.threads)
    torch.manual_seed(MODEL_SEED)
    start = time.perf_counter()

    tokenizer = word_tokenizer(caption_words())
    config = parse_config(build_config_dict(tokenizer))
    preprocessor = derive_preprocessor(config.vision_config)
    pool = make_pool(pool_size, TRAIN_SEED, preprocessor, tokenizer)
    heldout, heldout_captions = heldout_images(args.heldout)
    check_disjoint(pool, torch.from_numpy(preprocessor(heldout)))
    print(f"{len(pool.ids)} training images, vocabulary {len(tokenizer)}, image size {preprocessor.height}")

    lm, lm_loss = pretrain_language_model(config, pool, lm_steps, log_every)
    print(f"stage 1 (LM on caption text): {lm_steps} steps, final loss {lm_loss:.4f}")

    model = build_model(config, with_lora=True)
    adopt_pretrained_decoder(model, lm)
    caption_loss = train_captioner(model, pool, args.steps, log_every)
    train_time = time.perf_counter() - start
    print(f"stage 2 (image → caption, base decoder frozen): {args.steps} steps, final loss {caption_loss:.4f}")

    with atomic_output_dir(args.output_dir, args.force) as tmp:
        # preprocessor=None: real distilvit checkpoints carry none; the loader derives it.
        save_checkpoint(model, config, tokenizer, None, tmp, legacy_keys=True)
    write_heldout(images_dir, heldout, heldout_captions, args.force)

    size = sum(f.stat().st_size for f in args.output_dir.iterdir())
    parameters = sum(p.numel() for p in model.parameters())
    with_lora, without_lora = heldout_accuracy(args.output_dir, images_dir)
    print(f"training time      {train_time:.1f} s (torch threads: {args.threads})")
    print(f"final loss         {caption_loss:.4f}")
    print(f"checkpoint         {args.output_dir} ({size / 1e6:.2f} MB, {parameters:,} parameters)")
    print(f"held-out accuracy  {with_lora:.1%} of {args.heldout} (LoRA disabled: {without_lora:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

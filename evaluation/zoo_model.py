"""The zoo's model pieces: a char-level tokenizer, a tiny Llama, and a plain deterministic training loop."""

from __future__ import annotations

import math

from .zoo_tasks import training_text

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "".join(chr(c) for c in range(32, 127))  # printable ASCII, one token per character


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast: BOS prepended, no merges, Fuse decoder.

    Saved with save_pretrained, it loads back with AutoTokenizer.from_pretrained(dir).
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIALS))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=128)


def new_model(tokenizer, *, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
              max_positions: int):
    """A randomly initialised LlamaForCausalLM sized for `tokenizer` (seed torch before calling)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def encode_examples(tokenizer, examples: list[dict], *, loss_on_prompt: bool) -> list[tuple[list[int], int]]:
    """(token ids with BOS and EOS, index of the first token that carries loss) per example.

    Pre-training puts loss on every token (a language model); fine-tuning only on the answer.
    """
    pairs = [training_text(e) for e in examples]
    ctx = tokenizer([c for c, _ in pairs], add_special_tokens=True)["input_ids"]
    tgt = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    return [(c + t + [tokenizer.eos_token_id], 1 if loss_on_prompt else len(c))
            for c, t in zip(ctx, tgt, strict=True)]


def train(model, encoded: list[tuple[list[int], int]], *, steps: int, lr: float, batch_size: int,
          seed: int, pad_id: int) -> list[float]:
    """AdamW with linear warmup + cosine decay on seeded random batches; returns the loss curve."""
    import torch

    if steps <= 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    for _ in range(steps):
        batch = [encoded[i] for i in torch.randint(len(encoded), (batch_size,), generator=gen).tolist()]
        width = max(len(seq) for seq, _ in batch)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (seq, start) in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, start:len(seq)] = torch.tensor(seq[start:])
            mask[row, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def relative_delta(expert: dict, base: dict) -> float:
    """||expert - base|| / ||base|| over all parameters: how far a fine-tune moved from the base."""
    num = sum(float((expert[k].double() - base[k].double()).pow(2).sum()) for k in base)
    den = sum(float(base[k].double().pow(2).sum()) for k in base)
    return math.sqrt(num / den)

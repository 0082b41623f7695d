"""The three evaluators over a causal LM: perplexity, exact match (greedy), multiple choice (log-lik).

Each takes a loaded model + tokenizer and plain Python lists, so tests can hand them a tiny model
with known weights. Inputs are sorted by length and batched (right padding for scoring, left
padding for generation) to keep padding waste low; results come back in the input order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local HF-layout directory, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"not a model directory (no config.json): {model_dir}")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:  # many causal LMs ship without one; padding is always masked
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _max_len(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def _length_batches(lengths: Sequence[int], batch_size: int):
    """Index batches, longest first, so each batch holds sequences of similar length."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _right_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _token_logprobs(model, seqs: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """For each sequence, log p(token_t | tokens_<t) for t = 1..len-1 (float32, on CPU)."""
    ids, mask = _right_padded(seqs, pad_id, _device(model))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
    return [logp[row, :len(s) - 1] for row, s in enumerate(seqs)]


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16) -> float:
    """exp(total NLL / predicted tokens) over all texts; texts longer than the context are windowed."""
    window = _max_len(model)
    chunks: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        chunks.extend(ids[i:i + window] for i in range(0, len(ids), window))
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    nll, count = 0.0, 0
    for batch in _length_batches([len(c) for c in chunks], batch_size):
        for lp in _token_logprobs(model, [chunks[i] for i in batch], tokenizer.pad_token_id):
            nll -= float(lp.double().sum())
            count += lp.numel()
    return math.exp(nll / count)


def continuation_logprobs(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str],
                          *, batch_size: int = 16) -> list[float]:
    """Sum of log p(continuation tokens | context) for each pair; context gets the special tokens.

    Context and continuation are tokenised separately and concatenated, so the continuation's
    tokens are the same whatever the context (the lm-eval-harness convention).
    """
    window = _max_len(model)
    seqs, starts = [], []
    for ctx, cont in zip(contexts, continuations, strict=True):
        ctx_ids = tokenizer(ctx, add_special_tokens=True)["input_ids"]
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not ctx_ids:
            raise ValueError(f"context {ctx!r} tokenises to nothing and the tokenizer adds no BOS")
        if not cont_ids:
            raise ValueError(f"continuation {cont!r} tokenises to nothing")
        seq = (ctx_ids + cont_ids)[-window:]
        if len(cont_ids) >= len(seq):
            raise ValueError(f"continuation {cont[:40]!r} does not fit the model's {window}-token context")
        seqs.append(seq)
        starts.append(len(seq) - len(cont_ids))
    out = [0.0] * len(seqs)
    for batch in _length_batches([len(s) for s in seqs], batch_size):
        for i, lp in zip(batch, _token_logprobs(model, [seqs[i] for i in batch], tokenizer.pad_token_id),
                         strict=True):
            out[i] = float(lp[starts[i] - 1:].double().sum())  # lp[t-1] scores token t
    return out


def multiple_choice(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                    answers: Sequence[int], *, batch_size: int = 16) -> float:
    """Fraction of prompts whose highest-log-likelihood choice is the answer (ties: first choice)."""
    flat_ctx = [p for p, cs in zip(prompts, choices, strict=True) for _ in cs]
    flat_cont = [c for cs in choices for c in cs]
    scores = continuation_logprobs(model, tokenizer, flat_ctx, flat_cont, batch_size=batch_size)
    correct, pos = 0, 0
    for cs, answer in zip(choices, answers, strict=True):
        mine = scores[pos:pos + len(cs)]
        pos += len(cs)
        correct += int(max(range(len(cs)), key=lambda k: (mine[k], -k)) == answer)
    return correct / len(answers)


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                    batch_size: int = 16, stop: Sequence[str] = ()) -> list[str]:
    """Greedy continuations (special tokens dropped, cut at the first stop string), batched with left padding."""
    window = _max_len(model)
    keep = max(1, window - max_new_tokens)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"][-keep:] for p in prompts]
    pad_id = tokenizer.pad_token_id
    device = _device(model)
    out = [""] * len(prompts)
    for batch in _length_batches([len(e) for e in encoded], batch_size):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - len(encoded[i]):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(batch):
            text = tokenizer.decode(_until_eos(gen[row, width:].tolist(), tokenizer.eos_token_id),
                                    skip_special_tokens=True)
            for s in stop:
                text = text.split(s, 1)[0]
            out[i] = text
    return out


def _until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def default_max_new_tokens(tokenizer, answers: Sequence[str]) -> int:
    """Longest answer in tokens + 2: room to see a model run on past the answer, which is wrong."""
    return max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 2


def exact_match(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                max_new_tokens: int | None = None, stop: Sequence[str] = (), batch_size: int = 16) -> float:
    """Fraction of prompts whose greedy continuation, whitespace-stripped, equals the stripped answer."""
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, answers)
    preds = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, stop=stop)
    return sum(p.strip() == a.strip() for p, a in zip(preds, answers, strict=True)) / len(answers)

"""Evaluators on models whose outputs are known.

A "bigram" Llama is built by hand: attention and MLP outputs are zeroed, embeddings are one-hot,
and lm_head maps each token to a chosen successor with logit `a`, all others 0. So
p(successor | token) = e^a / (e^a + V - 1) exactly, and greedy generation follows the chain.
Random-weight models check batching/padding against unbatched computations written here.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evaluation import evaluators
from evaluation.evaluate import evaluate_checkpoint
from evaluation.zoo_model import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _config(tok, **kw):
    base = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False, rms_norm_eps=1e-6)
    base.update(kw)
    return LlamaConfig(**base)


def bigram_model(tok, chain: str, scale: float):
    """Each char of `chain` is followed by the next one; the last and every other token by EOS."""
    cfg = _config(tok)
    model = LlamaForCausalLM(cfg).eval()
    ids = [tok.convert_tokens_to_ids(c) for c in chain]
    succ = {t: tok.eos_token_id for t in range(cfg.vocab_size)}
    succ.update(zip(ids, ids[1:], strict=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.model.norm] + [m for layer in model.model.layers
                                          for m in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[torch.arange(cfg.vocab_size), torch.arange(cfg.vocab_size)] = 1.0
        for t, nxt in succ.items():
            model.lm_head.weight[nxt, t] = scale
    # logit of the successor after RMSNorm of a one-hot vector
    a = scale / math.sqrt(1 / cfg.hidden_size + cfg.rms_norm_eps)
    return model, succ, a


def random_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2, **kw)).eval()


def manual_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, one unpadded sequence at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------ perplexity


def test_perplexity_of_uniform_model_is_vocab_size(tok):
    model, _, _ = bigram_model(tok, "", scale=0.0)  # all logits 0: uniform over the vocabulary
    assert evaluators.perplexity(model, tok, ["hello world", "abc"], batch_size=2) == pytest.approx(len(tok))


def test_perplexity_of_bigram_model_matches_formula(tok):
    model, succ, a = bigram_model(tok, "=42", scale=0.05)
    texts = ["x=42", "=4", "hello=42"]
    V = len(tok)
    log_hit = a - math.log(math.exp(a) + V - 1)
    log_miss = -math.log(math.exp(a) + V - 1)
    nll, n = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"]
        for prev, cur in zip(ids, ids[1:], strict=False):
            nll -= log_hit if succ[prev] == cur else log_miss
            n += 1
    got = evaluators.perplexity(model, tok, texts, batch_size=2)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_perplexity_batched_equals_unbatched_random_model(tok, batch_size):
    model = random_model(tok)
    texts = ["a", "hello there", "xy=12", "the quick brown fox", "q"]
    lps = [manual_logprobs(model, tok(t)["input_ids"]) for t in texts]
    expected = math.exp(-sum(float(lp.sum()) for lp in lps) / sum(lp.numel() for lp in lps))
    assert evaluators.perplexity(model, tok, texts, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)


def test_perplexity_windows_long_texts(tok):
    model = random_model(tok, max_position_embeddings=16)
    text = "abcdefghij" * 4  # 41 tokens with BOS: windows of 16, 16, 9
    ids = tok(text)["input_ids"]
    lps = [manual_logprobs(model, ids[i:i + 16]) for i in range(0, len(ids), 16)]
    expected = math.exp(-sum(float(lp.sum()) for lp in lps) / sum(lp.numel() for lp in lps))
    assert evaluators.perplexity(model, tok, [text]) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ exact match / generation


def test_exact_match_with_known_answers(tok):
    model, _, _ = bigram_model(tok, "=42", scale=5.0)  # after '=' the model always says "42" then EOS
    prompts = ["a=", "bbbb=", "c=", "dd"]
    assert evaluators.generate_greedy(model, tok, prompts, max_new_tokens=5, batch_size=3) == ["42", "42", "42", ""]
    assert evaluators.exact_match(model, tok, prompts, ["42", " 42 ", "43", "42"], batch_size=3) == 0.5
    # one token is not enough for "42"; a stop string cuts the generation
    assert evaluators.exact_match(model, tok, prompts[:2], ["42", "42"], max_new_tokens=1) == 0.0
    assert evaluators.exact_match(model, tok, prompts[:2], ["4", "4"], stop=["2"]) == 1.0


def test_exact_match_rejects_answers_followed_by_more_text(tok):
    model, _, _ = bigram_model(tok, "=425", scale=5.0)  # says "425": the answer "42" plus more
    assert evaluators.exact_match(model, tok, ["x="], ["42"]) == 0.0


def test_batched_left_padded_generation_equals_one_at_a_time(tok):
    model = random_model(tok, seed=3)
    prompts = ["a", "hello there", "xy=12", "the quick brown", "q=", "sort 3912="]
    one_by_one = [evaluators.generate_greedy(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert evaluators.generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=4) == one_by_one
    assert len(set(one_by_one)) > 1  # the model is not trivially constant


# ------------------------------------------------------------------ multiple choice


def test_continuation_logprobs_match_formula_on_bigram_model(tok):
    model, _, a = bigram_model(tok, "=42", scale=0.05)
    lse = math.log(math.exp(a) + len(tok) - 1)
    got = evaluators.continuation_logprobs(model, tok, ["q=", "q=", "q="], ["42", "43", "x"], batch_size=2)
    assert got == pytest.approx([2 * (a - lse), (a - lse) - lse, -lse], rel=1e-5)


def test_continuation_logprobs_batched_equal_manual_random_model(tok):
    model = random_model(tok, seed=1)
    ctxs, conts = ["min 3917=", "a", "hello "], ["1", "bcd", "world"]
    expected = []
    for c, k in zip(ctxs, conts, strict=True):
        ctx_ids = tok(c)["input_ids"]
        lp = manual_logprobs(model, ctx_ids + tok(k, add_special_tokens=False)["input_ids"])
        expected.append(float(lp[len(ctx_ids) - 1:].sum()))
    assert evaluators.continuation_logprobs(model, tok, ctxs, conts, batch_size=2) == pytest.approx(expected, rel=1e-4)


def test_multiple_choice_picks_highest_loglikelihood(tok):
    model = random_model(tok, seed=2)
    prompts = ["min 3917=", "pick:", "z"]
    choices = [["3", "9", "1", "7"], ["yes", "no"], ["ab", "ba", "aa"]]
    best, worst = [], []
    for p, cs in zip(prompts, choices, strict=True):
        lls = evaluators.continuation_logprobs(model, tok, [p] * len(cs), cs)
        best.append(max(range(len(cs)), key=lambda i: lls[i]))
        worst.append(min(range(len(cs)), key=lambda i: lls[i]))
    assert evaluators.multiple_choice(model, tok, prompts, choices, best, batch_size=3) == 1.0
    assert evaluators.multiple_choice(model, tok, prompts, choices, worst, batch_size=3) == 0.0
    model, _, _ = bigram_model(tok, "=42", scale=1.0)
    assert evaluators.multiple_choice(model, tok, ["x=", "y="], [["43", "42"], ["42", "24"]], [1, 0]) == 1.0


# ------------------------------------------------------------------ the entry point


def test_evaluate_checkpoint_end_to_end(tok, tmp_path):
    model, _, _ = bigram_model(tok, "=42", scale=5.0)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    tok.save_pretrained(tmp_path / "model")
    rows = {
        "em": [{"prompt": "a=", "answer": "42"}, {"prompt": "b=", "answer": 42}, {"prompt": "c", "answer": "42"}],
        "mc": [{"prompt": "x=", "choices": ["43", "42"], "answer": "42"},
               {"prompt": "y=", "choices": ["42", "24"], "answer": 1}],
        "ppl": [{"text": "=42"}, {"text": "abc"}],
    }
    for name, rs in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    (tmp_path / "suite.yaml").write_text(
        "name: t\ntasks:\n"
        "  - {name: em, metric: exact_match, data: em.jsonl, split: held_in, expert: e1}\n"
        "  - {name: mc, metric: multiple_choice, data: mc.jsonl, split: held-out}\n"
        "  - {name: ppl, metric: perplexity, data: ppl.jsonl, split: held_out}\n"
    )
    scores = evaluate_checkpoint(tmp_path / "model", tmp_path / "suite.yaml", batch_size=2)
    by = {s.task: s for s in scores}
    assert [s.task for s in scores] == ["em", "mc", "ppl"]
    assert by["em"].value == pytest.approx(2 / 3) and by["em"].num_examples == 3
    assert by["mc"].value == 0.5 and by["mc"].split == "held_out"
    assert by["ppl"].value == pytest.approx(evaluators.perplexity(model, tok, ["=42", "abc"]), rel=1e-5)
    assert by["em"].data_digest == hashlib.sha256((tmp_path / "em.jsonl").read_bytes()).hexdigest()
    only = evaluate_checkpoint(tmp_path / "model", tmp_path / "suite.yaml", tasks=["mc"])
    assert [s.task for s in only] == ["mc"]


def test_evaluate_checkpoint_checks_data_before_loading_the_model(tmp_path):
    (tmp_path / "suite.yaml").write_text(
        "tasks:\n  - {name: em, metric: exact_match, data: nope.jsonl, split: held_out}\n")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        evaluate_checkpoint(tmp_path / "no-model-here", tmp_path / "suite.yaml")
    (tmp_path / "nope.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate_checkpoint(tmp_path / "no-model-here", tmp_path / "suite.yaml")


def test_evaluate_checkpoint_dtype_override(tok, tmp_path):
    model, _, _ = bigram_model(tok, "=42", scale=5.0)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "em.jsonl").write_text('{"prompt": "a=", "answer": "42"}\n')
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: em, metric: exact_match, data: em.jsonl, split: held_out}\n")
    [score] = evaluate_checkpoint(tmp_path / "model", tmp_path / "s.yaml", dtype="bfloat16")
    assert score.value == 1.0
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        evaluate_checkpoint(tmp_path / "model", tmp_path / "s.yaml", dtype="int8")

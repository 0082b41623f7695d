"""Synthetic Llama-layout checkpoints for the benchmark: a base and experts that differ from it by
small, fine-tuning-like deltas. Written straight with safetensors (no model is instantiated), once,
then reused from the cache directory.

Shapes: Llama's (vocab 32000, untied embeddings, grouped-query attention with half as many KV heads,
SwiGLU MLP of ~2.75x the width). The width is the largest that keeps the embeddings at most half the
parameters with at least 8 layers; `layers` fills the rest. The scale runs double the parameter
count twice over: with more layers at the same width (the largest tensor stays the same size), and
at the next width up (the largest tensor grows 1.5x).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

GENERATOR_VERSION = 2  # bump when the data changes: cached checkpoints are keyed on it
VOCAB = 32000
WIDTHS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096)
BASE_STD = 0.02      # weights ~ N(0, 0.02^2), like an initialised / pre-trained Llama
DELTA_STD = 0.0015   # fine-tuning deltas: ~7% of the weights' scale, per expert a different pattern


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    @property
    def largest(self) -> int:
        return max(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "initializer_range": BASE_STD,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "use_cache": True,
        }

    def describe(self) -> str:
        return (f"{self.params / 1e6:.0f}M params: hidden {self.hidden}, {self.layers} layers, "
                f"MLP {self.intermediate}, vocab {self.vocab}; largest tensor {self.largest / 1e6:.1f}M")


def parse_count(text: str | int) -> int:
    """'250M', '1.5B', '60m', 250000000 -> an integer."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace("_", "")
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(s[-1:], 1)
    return int(float(s.rstrip("KMBG")) * mult)


def _with_width(hidden: int, params: int) -> Shape:
    intermediate = max(128, round(hidden * 2.75 / 128) * 128)
    heads = max(2, hidden // 64)
    probe = Shape(hidden, intermediate, 1, heads, max(1, heads // 2))
    per_layer = probe.params - Shape(hidden, intermediate, 0, heads, max(1, heads // 2)).params
    fixed = probe.params - per_layer
    layers = max(1, round((params - fixed) / per_layer))
    return Shape(hidden, intermediate, layers, heads, max(1, heads // 2))


def shape_for(params: int, hidden: int | None = None) -> Shape:
    """A Llama shape of about `params` parameters (at `hidden`, or the widest that keeps the
    embeddings at most half of the model with at least 8 layers)."""
    if hidden is not None:
        return _with_width(hidden, params)
    fitting = [s for s in map(lambda w: _with_width(w, params), WIDTHS)
               if 2 * VOCAB * s.hidden <= 0.5 * params and s.layers >= 8]
    return fitting[-1] if fitting else _with_width(WIDTHS[0], params)


def wider(hidden: int) -> int:
    """The next width up: the scale run whose largest tensor grows with the model."""
    return next((w for w in WIDTHS if w > hidden), hidden * 3 // 2)


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights sit around 1
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen).mul_(BASE_STD)


def _delta(shape: tuple[int, ...], gen: torch.Generator, expert: int) -> torch.Tensor:
    """A fine-tune's delta: dense small noise, heavier-tailed on some rows (what TIES trims)."""
    scale = DELTA_STD * (0.6 + 0.2 * expert)  # experts moved by different amounts
    d = torch.randn(shape, generator=gen).mul_(scale)
    if len(shape) == 2:
        rows = torch.rand(shape[0], generator=gen) < 0.05  # a few rows changed a lot more
        d[rows] *= 4.0
    return d


def generate(root: Path, shape: Shape, experts: int = 4, seed: int = 0, log=print) -> tuple[Path, list[Path]]:
    """root/base and root/expert-<i> (bf16, model.safetensors + config.json); reused if already there."""
    root = Path(root)
    meta = {"shape": asdict(shape), "experts": experts, "seed": seed, "version": GENERATOR_VERSION}
    done = root / "DONE.json"
    names = ["base", *[f"expert-{i}" for i in range(experts)]]
    if done.exists() and json.loads(done.read_text()) == meta:
        return root / "base", [root / n for n in names[1:]]
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    log(f"generating {len(names)} checkpoints of {shape.describe()} in {root} ...")
    dirs = [root / n for n in names]
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(shape.config(), indent=2))
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    # One pass per tensor group keeps memory at one checkpoint's worth per output file.
    gen = torch.Generator().manual_seed(seed)
    base = {name: _tensor(name, s, gen).to(torch.bfloat16) for name, s in shape.tensors()}
    save_file(base, str(dirs[0] / "model.safetensors"), metadata={"format": "pt"})
    for e, d in enumerate(dirs[1:]):
        gen = torch.Generator().manual_seed(seed * 1000 + e + 1)
        out = {}
        for name, s in shape.tensors():
            out[name] = (base[name].float() + _delta(s, gen, e)).to(torch.bfloat16)
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
        del out
    done.write_text(json.dumps(meta))
    size = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    log(f"  {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return dirs[0], dirs[1:]


def input_files(dirs: list[Path]) -> list[Path]:
    return [f for d in dirs for f in sorted(d.glob("*.safetensors"))]


def total_bytes(dirs: list[Path]) -> int:
    return sum(os.path.getsize(f) for f in input_files(dirs))

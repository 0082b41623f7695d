"""Small generated checkpoints for the flow tests: a tiny Llama base and experts fine-tuned in
name only (the base plus small noise, like a real fine-tune's deltas)."""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_zoo(root: Path, n_experts: int = 3, *, layers: int = 3, hidden: int = 32,
                   dtype=torch.bfloat16, seed: int = 0) -> tuple[Path, list[Path]]:
    """Saves root/base and root/expert-<i> in Hugging Face layout (safetensors)."""
    config = LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    base = root / "base"
    model.save_pretrained(base)
    experts = []
    gen = torch.Generator().manual_seed(seed + 1)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(n_experts):
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen) * 0.02
                p.copy_((original[name].float() + noise).to(dtype))
        path = root / f"expert-{i}"
        model.save_pretrained(path)
        experts.append(path)
    return base, experts


def upload_dir(local: Path, bucket: str, prefix: str, endpoint: str) -> str:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for f in sorted(local.iterdir()):
        s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


def download_dir(uri: str, local: Path, endpoint: str) -> Path:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    local.mkdir(parents=True, exist_ok=True)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            s3.download_file(bucket, obj["Key"], str(local / obj["Key"].rsplit("/", 1)[-1]))
    return local


def read_events(name: str, resource_id: str, timeout: float) -> list:
    """The Prefect API's events of this name about this resource, polled until one has arrived or
    `timeout` seconds have passed (events reach the server a little after they are emitted)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id]))
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=flt, limit=50).events
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.5)

"""Shared builders for the inference tests (test_infer_*.py): small models, references, a tokenizer.

Everything is cached per session (functools.cache), so the test files share one build.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from dsv32 import ModelConfig, Transformer


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Import into a test module: its nano-sized ops run on one thread (threads only add sync cost there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nano(**changes) -> ModelConfig:
    return ModelConfig.preset("nano").replace(**changes)


@functools.cache
def nano_model(seed: int = 0, std: float = 0.08, **changes) -> Transformer:
    """A random nano model (std 0.08: peaked enough for greedy decoding to have clear winners)."""
    torch.manual_seed(seed)
    model = Transformer(nano(initializer_range=std, **changes)).eval()
    with torch.no_grad():  # a non-zero balance bias, as in test_model
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model


def prompts_for(cfg: ModelConfig, lengths, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache): the ground truth for the engine."""
    seq = torch.tensor([prompt])
    out = []
    for _ in range(n):
        token = int(model(seq, logits_to_keep=1).logits[0, -1].argmax())
        out.append(token)
        seq = torch.cat((seq, torch.tensor([[token]])), dim=1)
    return out


def successor(t: int, vocab: int) -> int:
    """The rule of the periodic training data: a fixed permutation of the non-special ids."""
    return 2 + (7 * (t - 2) + 3) % (vocab - 2)


@functools.cache
def periodic_model(steps: int = 70) -> Transformer:
    """A nano model trained until its main head and its MTP head both know `successor` (seconds).

    With a trained MTP layer, speculative decoding accepts most drafts, so both the accept and the
    reject paths of the verification get exercised.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nano's matmuls are too small to gain from threads; a busy machine makes them cost
    try:
        return _train_periodic(steps).eval()
    finally:
        torch.set_num_threads(threads)


def _train_periodic(steps: int) -> Transformer:
    torch.manual_seed(0)
    cfg = nano()
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(2, cfg.vocab_size, (16,), generator=g).tolist()
        rows = []
        for t in starts:
            row = [t]
            for _ in range(31):
                row.append(successor(row[-1], cfg.vocab_size))
            rows.append(row)
        ids = torch.tensor(rows)
        out = model(ids, return_mtp=True)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + F.cross_entropy(out.mtp_logits[0][:, :-1].flatten(0, 1), ids[:, 2:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@functools.cache
def tiny_tokenizer():
    """A 512-id byte-level BPE trained on a few stdlib files (fits the nano vocabulary)."""
    from dsv32.data.corpus import stdlib_documents
    from dsv32.tokenizer import train_tokenizer

    texts = [d.text for d in stdlib_documents("train", limit=12)]
    texts.append("Hello world! The quick brown fox jumps over the lazy dog. STOP here. " * 20)
    return train_tokenizer(texts, 512, show_progress=False)

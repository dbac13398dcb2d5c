"""Loading a checkpoint into an engine, in one process or across a torchrun job.

`dsv32 generate`, `chat` and `serve` share this block, and so can any other command (eval):

    from dsv32.infer.launch import parallel_engine

    with parallel_engine("ckpt_dir", max_batch=8) as (engine, tokenizer):
        if engine is None:        # a follower rank of a torchrun job: it has run rank 0's forwards
            return 0              # until rank 0 left the `with` block; nothing else to do
        ...                       # rank 0 (or a single process): use `engine` like any Engine

Run alone it is `load_pretrained` + `Engine`. Under `torchrun --nproc_per_node N` every rank loads
only its slice of the checkpoint (dsv32.infer.parallel describes the layout), rank 0 gets a
`DriverEngine` and the others follow it inside `__enter__`; leaving the block on rank 0 releases
them, and every rank destroys its process groups on the way out.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from dsv32.cli import CLIError

DEFAULT_MAX_SEQ_LEN = 4096


def load_model(model_dir: str, dtype: torch.dtype, ctx, placement=None):
    """The whole model in one process, or this rank's shard of it (straight from the safetensors files)."""
    from dsv32.checkpoint import load_pretrained, load_sharded
    from dsv32.infer.parallel import parallelize

    if not ctx.distributed:
        if placement is not None:
            raise CLIError("an expert placement needs several ranks (run under torchrun)")
        return load_pretrained(model_dir, dtype=dtype, device=ctx.device)
    return load_sharded(model_dir, lambda meta: parallelize(meta, ctx, placement), dtype=dtype, device=ctx.device)


def expert_placement(load_file: str | None, redundant: int, ctx, cfg, log=None):
    """The EPLB placement computed from recorded expert load (None without a load file); logs the report."""
    if load_file is None:
        if redundant:
            raise CLIError("--redundant-experts needs --expert-load")
        return None
    if not ctx.distributed:
        raise CLIError("--expert-load places experts on several ranks: run under torchrun")
    from dsv32.infer.eplb import balanced_placement, placement_report, read_expert_load

    load = read_expert_load(load_file, cfg)
    placement = balanced_placement(load, ctx.world_size, redundant)
    if log is not None:
        log(placement_report(load, placement, ctx.world_size))
    return placement


@contextmanager
def parallel_engine(model_dir: str, *, tokenizer_dir: str | None = None, dtype: str = "fp32", int8: bool = False,
                    speculative: bool = False, max_seq_len: int | None = None, max_batch: int = 8,
                    prefix_caching: bool = True, compile: bool = False, threads: int = 0,
                    expert_load: str | None = None, redundant_experts: int = 0, log=None):
    """Yields (engine, tokenizer) on rank 0 / alone, (None, tokenizer) on follower ranks; see the module doc.

    expert_load / redundant_experts: balance the routed experts over the ranks from recorded load
    (dsv32.infer.eplb), with that many extra copies of the hottest experts per MoE layer.
    log: called with report lines on rank 0 (e.g. the expert placement's before/after imbalance).
    """
    from dsv32.cli_model import parse_dtype
    from dsv32.infer.decode import pair_expert_weights
    from dsv32.infer.engine import Engine
    from dsv32.infer.parallel import DriverEngine, follow, init_parallel, shutdown
    from dsv32.infer.quant import quantize_int8
    from dsv32.tokenizer import Tokenizer

    if threads:
        torch.set_num_threads(threads)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"no such checkpoint directory: {model_dir}")
    torch_dtype = parse_dtype(dtype, ("fp32", "float32", "bf16", "bfloat16"))
    tokenizer = Tokenizer.load(tokenizer_dir or model_dir)
    ctx = init_parallel()
    in_step = False  # True once every rank has reached the same point (then they can leave together)
    try:
        if int8 and ctx.distributed:
            raise CLIError("--int8 runs in one process only (its layers do not combine across ranks)")
        if compile and ctx.distributed:
            raise CLIError("--compile runs in one process only")
        from dsv32.config import ModelConfig

        placement = expert_placement(expert_load, redundant_experts, ctx, ModelConfig.from_pretrained(model_dir),
                                     log if ctx.is_driver else None)
        model = load_model(model_dir, torch_dtype, ctx, placement)
        cfg = model.config
        if tokenizer.vocab_size > cfg.vocab_size:
            raise CLIError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}")
        if int8:
            quantize_int8(model)
        elif not ctx.distributed:
            pair_expert_weights(model)  # same values; one matmul for an expert's gate and up at decode
        if speculative and not len(model.mtp):
            raise CLIError("--speculative needs a checkpoint with an MTP layer")
        limit = cfg.max_position_embeddings
        max_seq_len = max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN)
        if not 2 <= max_seq_len <= limit:
            raise CLIError(f"--max-seq-len must be in [2, {limit}] for this model, got {max_seq_len}")
        if max_batch < 1:
            raise CLIError(f"--max-batch must be >= 1, got {max_batch}")
        settings = dict(max_batch=max_batch, max_seq_len=max_seq_len, speculative=speculative,
                        prefix_caching=prefix_caching, compile=compile)
        if not ctx.distributed:
            yield Engine(model, tokenizer=tokenizer, **settings), tokenizer
        elif ctx.is_driver:
            engine = DriverEngine(model, ctx, tokenizer=tokenizer, **settings)
            try:
                yield engine, tokenizer
            finally:
                engine.close()  # even after an error here: the followers are waiting for the next step
                in_step = True
        else:
            follow(Engine(model, **settings), ctx)
            in_step = True
            yield None, tokenizer
        in_step = True
    finally:
        shutdown(sync=in_step)

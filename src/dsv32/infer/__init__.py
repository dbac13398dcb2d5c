"""Inference: the paged latent cache, sampling, the continuous-batching engine, MTP speculation, int8.

    from dsv32.infer import Engine, SamplingParams
    engine = Engine(model, max_batch=8, max_seq_len=4096)
    [done] = engine.complete([prompt_ids], SamplingParams(max_tokens=64, temperature=0))
"""
from dsv32.infer.decode import DecodePath, pair_expert_weights
from dsv32.infer.engine import Completion, Engine, RequestOutput, Usage
from dsv32.infer.quant import perplexity, quantize_int8
from dsv32.infer.sampling import SamplingParams, TokenLogprob

__all__ = ["Completion", "DecodePath", "Engine", "RequestOutput", "SamplingParams", "TokenLogprob", "Usage",
           "perplexity", "quantize_int8", "pair_expert_weights"]

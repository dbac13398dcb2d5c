"""Scale-out inference: 2 ranks (gloo, CPU) give the single-process greedy output; each rank loads its slice.

- in-process: every rank's tensors, loaded slice by slice from an FP8 checkpoint (ranges that are not
  128-aligned), equal the same slices of the fully loaded model, and a rank holds
  replicated + (total - replicated) / N bytes (the replicated set is listed here by hand);
- 2 spawned ranks (V3 with attention biases and no q-LoRA; V3.2 with DSA, chunked prefill, MTP
  speculation and an EPLB placement with redundant experts): the engine's greedy tokens equal one
  process, and each rank holds its share of the bytes;
- the real CLI under torchrun: `generate` prints what one process prints, and `serve` answers a chat
  request with what a one-process server answers.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import warnings

import httpx
import pytest
import torch
import torch.multiprocessing as mp

from dsv32 import ModelConfig, Transformer
from dsv32.checkpoint import load_pretrained, load_sharded, save_pretrained
from dsv32.infer import Engine, SamplingParams
from dsv32.infer.eplb import balanced_placement
from dsv32.infer.parallel import ParallelContext, parallelize
from serve_common import InProcessServer, small_tokenizer

from infer_common import prompts_for, single_thread  # noqa: F401  (fixture)

WORLD = 2
ENGINE = dict(max_batch=3, max_seq_len=128, max_prefill_tokens=16)   # chunked prefill, continuous batching
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
# prompts longer than nano's index_topk (16): DSA selects keys sparsely
LENGTHS = (5, 40, 23)

CONFIGS = {
    "v3": dict(model_type="deepseek_v3", q_lora_rank=None, attention_bias=True),
    "v3.2": {},
}


def nano(name: str) -> ModelConfig:
    return ModelConfig.preset("nano").replace(initializer_range=0.08, **CONFIGS[name])


def write_checkpoint(cfg: ModelConfig, out, fp8: bool = False, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # a non-zero balance bias and biases, so that both are loaded and used
        for name, t in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith(("e_score_correction_bias", ".bias")) and "norm" not in name:
                t.copy_(torch.randn_like(t) * 0.05)
    save_pretrained(model, out, fp8=fp8)
    small_tokenizer().save(out)
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# every rank holds these whole: norms, the latent projections, the router, the DSA indexer, MTP's eh_proj,
# and o_proj's bias (added once, after the all-reduce of the row-parallel product)
REPLICATED = re.compile(r"norm\.|q_a_proj|kv_a_proj_with_mqa|\.mlp\.gate\.|\.indexer\.|eh_proj|o_proj\.bias")


def expected_rank_bytes(full_state: dict, world: int) -> int:
    replicated = nbytes(t for k, t in full_state.items() if REPLICATED.search(k))
    return replicated + (nbytes(full_state.values()) - replicated) // world


# ---------------------------------------------------------------------- loading slices (in process)
def test_each_rank_loads_only_its_slice_of_an_fp8_checkpoint(tmp_path):
    # sizes whose halves are not multiples of the 128x128 FP8 blocks: 384 -> [192, 384), 192 -> [96, 192)
    cfg = nano("v3.2").replace(hidden_size=160, intermediate_size=384, moe_intermediate_size=96, n_shared_experts=2)
    ckpt = write_checkpoint(cfg, tmp_path, fp8=True)
    full = load_pretrained(ckpt).state_dict()
    total = 0
    for rank in range(WORLD):
        ctx = ParallelContext(rank=rank, world_size=WORLD)
        taken = {}

        def shard(meta, ctx=ctx):
            taken.update(parallelize(meta, ctx))
            return taken

        local = load_sharded(ckpt, shard).state_dict()
        for key, tensor in local.items():
            sl = taken.get(key)
            want = full[sl.key if sl else key]
            if sl is not None and sl.experts is not None:
                want = want[list(sl.experts)]
            elif sl is not None and sl.dim is not None:
                want = want.narrow(sl.dim, sl.start, sl.stop - sl.start)
            torch.testing.assert_close(tensor, want, rtol=0, atol=0, msg=key)
        local_bytes = nbytes(local.values())
        assert local_bytes == expected_rank_bytes(full, WORLD), rank
        total += local_bytes
    assert total < 0.6 * WORLD * nbytes(full.values())  # about its share each, not the whole


def test_layouts_that_do_not_split_are_refused():
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("nano"))
    with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
        parallelize(model, ParallelContext(rank=0, world_size=3))


# ---------------------------------------------------------------------- 2 ranks (spawned)
def _worker(rank: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from dsv32.infer.parallel import init_parallel, shutdown

    ctx = init_parallel("cpu")
    ok = False
    try:
        fn(ctx, *args)
        ok = True
    finally:
        shutdown(sync=ok)


def _greedy_runs(ctx, jobs: dict, results_file: str) -> None:
    """For each config, for each (placement, speculative): load this rank's shard and run the prompts;
    rank 0 drives, rank 1 follows. Rank 0 saves its tokens; the test asserts (a rank failing here
    would leave its peer waiting)."""
    from dsv32.infer.parallel import DriverEngine, follow

    got, held = {}, {}
    for name, (ckpt, prompts, runs) in jobs.items():
        for placement, speculative in runs:
            model = load_sharded(ckpt, lambda meta: parallelize(meta, ctx, placement))
            if placement is None:
                held[name] = nbytes(model.state_dict().values())
            if ctx.is_driver:
                engine = DriverEngine(model, ctx, speculative=speculative, **ENGINE)
                try:
                    got.setdefault(name, []).append([c.token_ids for c in engine.complete(prompts, GREEDY)])
                finally:
                    engine.close()
            else:
                follow(Engine(model, speculative=speculative, **ENGINE), ctx)
    torch.save(held, f"{results_file}.bytes{ctx.rank}")
    if ctx.is_driver:
        torch.save(got, results_file)


def test_two_ranks_generate_what_one_process_generates(tmp_path):
    """V3 (attention biases, no q-LoRA) and V3.2 (DSA); for V3.2 also MTP speculation (greedy: the same
    tokens) and a balanced expert placement with a copy of each layer's two hottest experts. One spawn
    runs them all (starting ranks is most of the cost on a small CPU box)."""
    jobs, expected, share = {}, {}, {}
    for name in CONFIGS:
        cfg = nano(name)
        ckpt = write_checkpoint(cfg, tmp_path / name)
        prompts = prompts_for(cfg, LENGTHS)
        full = load_pretrained(ckpt)
        share[name] = expected_rank_bytes(full.state_dict(), WORLD)
        expected[name] = [c.token_ids for c in Engine(full, **ENGINE).complete(prompts, GREEDY)]
        runs = [(None, False)]
        if name == "v3.2":
            n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
            load = torch.tensor([[400, 300, 10, 10, 5, 5, 1, 1]] * n_moe)    # skewed recorded load
            runs += [(None, True), (balanced_placement(load, WORLD, redundant=2), False)]
        jobs[name] = (ckpt, prompts, runs)
    results = str(tmp_path / "tokens.pt")
    mp.spawn(_worker, args=(free_port(), _greedy_runs, (jobs, results)), nprocs=WORLD, join=True)
    got = torch.load(results, weights_only=True)
    for name, (_, _, runs) in jobs.items():
        assert len(got[name]) == len(runs)
        for (placement, speculative), tokens in zip(runs, got[name]):
            assert tokens == expected[name], (name, "speculative" if speculative else "", placement)
    for rank in range(WORLD):  # what each rank had loaded: replicated + (total - replicated) / N
        assert torch.load(f"{results}.bytes{rank}", weights_only=True) == share, rank


# ---------------------------------------------------------------------- the CLI under torchrun
def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "dsv32.cli", *args]


def start_torchrun(*args: str, **popen) -> subprocess.Popen:
    """torchrun in its own session, so that `kill_job` can take its ranks down with it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(torchrun(*args), text=True, env=env, start_new_session=True, **popen)


def kill_job(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_generate_under_torchrun_prints_what_one_process_prints(tmp_path, capsys):
    from dsv32.cli import main

    ckpt = write_checkpoint(nano("v3.2"), tmp_path)
    args = ["generate", "--model", ckpt, "--prompt", "def main():", "--raw", "--temperature", "0",
            "--max-tokens", "24", "--no-color"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    proc = start_torchrun(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        kill_job(proc)
    assert proc.returncode == 0, err
    assert out == expected  # rank 0 prints the reply, the follower prints nothing


def test_server_under_torchrun_answers_what_one_process_answers(tmp_path):
    from dsv32.infer.launch import parallel_engine
    from dsv32.serve.app import create_app

    ckpt = write_checkpoint(nano("v3"), tmp_path)
    body = {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 16, "temperature": 0,
            "ignore_eos": True}
    with parallel_engine(ckpt, max_seq_len=512) as (engine, tokenizer):
        reference = InProcessServer(create_app(engine, tokenizer))
        try:
            expected = httpx.post(reference.url + "/v1/chat/completions", json=body, timeout=60).json()
        finally:
            reference.close()

    proc = start_torchrun("serve", "--model", ckpt, "--port", "0", "--max-seq-len", "512",
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].strip()
                break
        else:
            pytest.fail("the server did not start:\n" + "".join(lines))
        assert any("2 ranks" in line for line in lines)
        got = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    finally:
        proc.send_signal(signal.SIGTERM)  # torchrun hands it to both ranks; rank 0 shuts the job down
        try:
            proc.communicate(timeout=60)
        finally:
            kill_job(proc)
    assert got["choices"][0]["message"] == expected["choices"][0]["message"]
    assert got["usage"] == expected["usage"]

"""Scale-out: 2-rank FSDP2 and expert parallelism equal one process; checkpoints move between world sizes.

Multi-rank tests spawn 2 CPU processes on the gloo backend (torch.multiprocessing, a free port on
127.0.0.1). Each worker also computes the plain single-process reference itself (the nano model is
tiny), so a worker compares its distributed result against the undistributed math directly; any
assertion in a worker fails the test with that worker's traceback.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from dsv32 import ModelConfig, Transformer
from dsv32.model.moe import MoE
from dsv32.train import distributed as du
from dsv32.train import state as st

WORLD = 2
BATCH, SEQ = 4, 24           # global batch; each rank takes BATCH // WORLD rows
RTOL = 1e-5


# ---------------------------------------------------------------------- harness
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The references run in this process; on a shared 2-core box two spinning OpenMP threads make
    nano steps ~10x slower, and the spawned ranks need the cores. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    info = du.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main) == (rank, world, rank == 0)
    ok = False
    try:
        fn(info, *args)
        ok = True
    finally:
        du.destroy(sync=ok)


def spawn(fn, *args, world: int = WORLD) -> None:
    mp.spawn(_worker, args=(world, _free_port(), fn, args), nprocs=world, join=True)


# ---------------------------------------------------------------------- shared pieces
def nano(**changes) -> ModelConfig:
    return ModelConfig.preset("nano").replace(initializer_range=0.08, **changes)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Same weights in every process; a non-zero balance bias so it matters for routing."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.05)
    return model


def batch(cfg, seed=1):
    return torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def shard_rows(x: torch.Tensor, info) -> torch.Tensor:
    n = x.shape[0] // info.world_size
    return x[info.rank * n:(info.rank + 1) * n]


def loss_sum(model, ids):
    """(LM + MTP cross-entropy summed over targets, output); the caller divides by the global count."""
    out = model(ids, return_mtp=True)
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    mtp = F.cross_entropy(out.mtp_logits[0][:, :-1].flatten(0, 1), ids[:, 2:].flatten(), reduction="sum")
    return lm + 0.3 * mtp, out


def global_targets(ids_local) -> float:
    """Count local targets and sum over ranks: the loss denominator, as the training loop does it."""
    n = torch.tensor([float(ids_local[:, 1:].numel())], dtype=torch.float64)
    return float(du.all_reduce_sum(n)[0])


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_close(actual, expected, what):
    actual, expected = full(actual).detach(), expected.detach()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def assert_grads_match(model, ref):
    """Every parameter's gradient, gathered to a full tensor, equals the single-process one."""
    got = dict(model.named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert got[name].grad is None, f"{name}: gradient where the reference has none"
            continue
        assert got[name].grad is not None, f"{name}: no gradient"
        assert_close(got[name].grad, p.grad, f"grad {name}")
        checked += 1
    return checked


# ---------------------------------------------------------------------- single process: no-ops
def test_single_process_everything_is_a_noop(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = du.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert du.build_mesh(info, ep_size=1) is None
    model = build(nano())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert du.parallelize(model, info) is model and model.parallel_mesh is None
    assert du.apply_expert_parallel(model, None) is model and du.apply_fsdp(model, None) is model
    assert all(type(m.experts).__name__ == "Experts" for m in model.modules() if isinstance(m, MoE))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    t = torch.arange(3.0)
    assert du.all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0))
    du.barrier()
    assert du.is_main() and du.world_size() == 1


def test_clip_grad_norm_matches_torch_single_process():
    model, ref = build(nano()), build(nano())
    ids = batch(model.config)
    for m in (model, ref):
        loss_sum(m, ids)[0].backward()
    norm = du.clip_grad_norm(model, 0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert norm > 0.5 and abs(float(norm) - float(ref_norm)) <= RTOL * float(ref_norm)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


# ---------------------------------------------------------------------- (1) FSDP2 == one process
def _fsdp_step(info, ep_size: int, alpha: float):
    cfg = nano(aux_loss_alpha=alpha)
    ref, model = build(cfg), build(cfg)
    ids = batch(cfg)
    ref_sum, ref_out = loss_sum(ref, ids)
    ref_loss = ref_sum / ids[:, 1:].numel() + (ref_out.aux_loss if alpha else 0.0)
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))

    du.parallelize(model, info, ep_size=ep_size)
    mesh = model.parallel_mesh
    world = info.world_size
    assert mesh.dp.size() == world and mesh.ep_size == ep_size and mesh.dp_mod_ep.size() == world // ep_size
    # parameters are really sharded: each rank holds about 1/world of every block
    local = sum(p.to_local().numel() for p in model.layers[1].parameters())
    total = sum(p.numel() for p in ref.layers[1].parameters())
    assert local <= total // world + 64, (local, total)

    mine = shard_rows(ids, info)
    n_global = global_targets(mine)
    assert n_global == ids[:, 1:].numel()
    local_sum, out = loss_sum(model, mine)
    # the balance loss is a mean over the local sequences: weight it by this rank's share of them
    local_aux = out.aux_loss * (mine.shape[0] / ids.shape[0]) if alpha else torch.zeros(())
    (local_sum / n_global + local_aux).backward()

    loss = du.all_reduce_sum((local_sum / n_global + local_aux).detach().clone())
    assert_close(loss, ref_loss.detach(), "loss")
    # per-expert token counts: the all-reduce of the local counts is the global count
    counts = du.all_reduce_sum(out.expert_counts.clone())
    assert torch.equal(counts, ref_out.expert_counts), (counts, ref_out.expert_counts)
    assert not torch.equal(out.expert_counts, ref_out.expert_counts)  # ...and the local ones are not
    checked = assert_grads_match(model, ref)
    assert checked > 40
    # the global norm counts every shard (and with EP every expert) exactly once
    norm = du.clip_grad_norm(model, float("inf"))
    assert abs(float(norm) - float(ref_norm)) <= RTOL * float(ref_norm), (float(norm), float(ref_norm))


def test_fsdp2_two_ranks_match_one_process():
    spawn(_fsdp_step, 1, 0.0)


def test_fsdp2_with_expert_parallel_two_ranks_match_one_process():
    """The production layout (ep == world); also with the sequence-wise balance loss on."""
    spawn(_fsdp_step, 2, 0.01)


def test_fsdp2_expert_parallel_four_ranks_two_expert_replicas():
    """4 ranks = 2 (dp_mod_ep) x 2 (ep): each expert slice lives on 2 ranks and FSDP shards it over them."""
    spawn(_fsdp_step, 2, 0.01, world=4)


# ---------------------------------------------------------------------- (2) EP MoE == one process
def _ep_moe(info):
    cfg = nano()
    ref = build(cfg).layers[1].mlp
    assert isinstance(ref, MoE)
    moe = build(cfg).layers[1].mlp
    mesh = du.build_mesh(info, ep_size=WORLD)
    du.apply_expert_parallel(moe, mesh)
    experts = moe.experts
    E, n_local = cfg.n_routed_experts, cfg.n_routed_experts // WORLD
    assert (experts.n_experts, experts.n_local) == (E, n_local)
    # the rank keeps only its slice: experts [rank*E/N, (rank+1)*E/N) of the full weights
    lo = info.rank * n_local
    for name in ("gate_proj", "up_proj", "down_proj"):
        local = getattr(experts, name).to_local()
        assert local.shape[0] == n_local and local.untyped_storage().nbytes() == local.numel() * 4
        assert torch.equal(local, getattr(ref.experts, name)[lo:lo + n_local])

    x_all = torch.randn(BATCH, SEQ, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    g_all = torch.randn(BATCH, SEQ, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    # natural routing, then every token forced onto rank 0's experts (rank 1 receives nothing)
    forced = torch.arange(cfg.num_experts_per_tok).expand(BATCH, SEQ, -1)
    for forced_all in (None, forced):
        for m in (ref, moe):
            m.zero_grad(set_to_none=True)
        x_ref = x_all.clone().requires_grad_()
        y_ref, stats_ref = ref(x_ref, forced_all)
        (y_ref * g_all).sum().backward()

        x = shard_rows(x_all, info).clone().requires_grad_()
        y, stats = moe(x, None if forced_all is None else shard_rows(forced_all, info))
        (y * shard_rows(g_all, info)).sum().backward()

        assert_close(y, shard_rows(y_ref, info), "MoE output")
        assert_close(x.grad, shard_rows(x_ref.grad, info), "input grad")
        assert torch.equal(du.all_reduce_sum(stats.counts.clone()), stats_ref.counts)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert_close(getattr(experts, name).grad, getattr(ref.experts, name).grad, f"experts.{name} grad")
        # router and shared experts are replicated: their gradient is the sum of the ranks' parts
        for (name, p), (_, q) in zip(moe.named_parameters(), ref.named_parameters()):
            if not name.startswith("experts."):
                assert_close(du.all_reduce_sum(p.grad.clone()), q.grad, f"{name} grad")


def test_expert_parallel_moe_matches_one_process():
    spawn(_ep_moe)


# ---------------------------------------------------------------------- (3) checkpoints across world sizes
def _train_step(model, opt, ids_local, clip=True):
    """One AdamW step on the local rows; returns the global loss of the step (before the update)."""
    opt.zero_grad(set_to_none=True)
    n = global_targets(ids_local)
    local_sum, _ = loss_sum(model, ids_local)
    (local_sum / n).backward()
    if clip:
        du.clip_grad_norm(model, 1.0)
    opt.step()
    return float(du.all_reduce_sum(local_sum.detach().clone())) / n


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _ckpt_world2(info, root: str, out_json: str):
    """World 2 (FSDP + EP): resume from a world-1 checkpoint, check the next loss, step, save, step."""
    cfg = nano()
    model = build(cfg, seed=123)          # different weights: everything must come from the checkpoint
    du.parallelize(model, info, ep_size=WORLD)
    opt = _optimizer(model)
    step, extra = st.load_train_state(st.latest_checkpoint(root), model, opt)
    assert step == 1 and extra["note"] == "from world 1"
    ids = [batch(cfg, seed=s) for s in (10, 11, 12)]
    loss2 = _train_step(model, opt, shard_rows(ids[1], info))
    st.save_train_state(root, 2, model, opt, {"note": "from world 2", "rng": torch.get_rng_state()})
    loss3 = _train_step(model, opt, shard_rows(ids[2], info))
    if info.is_main:
        with open(out_json, "w") as f:
            json.dump({"loss2": loss2, "loss3": loss3}, f)


def test_checkpoint_moves_between_world_sizes(tmp_path):
    """1 process: step 1, save -> world 2 (FSDP+EP): load, step 2, save, step 3 -> 1 process: load, step 3.

    Each resumed step's loss must equal the uninterrupted single-process run's. The resumed models
    start from other weights and other balance biases, and AdamW's moments shape steps 2 and 3, so
    a piece not restored (weights, biases, optimizer state, an expert slice) changes the losses.
    """
    cfg = nano()
    ids = [batch(cfg, seed=s) for s in (10, 11, 12)]
    root = tmp_path / "ckpt"

    ref = build(cfg)
    ref_opt = _optimizer(ref)
    expected = []
    for step, x in enumerate(ids, start=1):
        expected.append(_train_step(ref, ref_opt, x))
        if step == 1:
            st.save_train_state(root, 1, ref, ref_opt, {"note": "from world 1"})
        if step == 2:
            biases = {k: v.clone() for k, v in ref.named_buffers() if k.endswith("e_score_correction_bias")}

    out_json = tmp_path / "world2.json"
    spawn(_ckpt_world2, str(root), str(out_json))
    got = json.loads(out_json.read_text())
    assert abs(got["loss2"] - expected[1]) <= RTOL * expected[1], (got, expected)
    assert abs(got["loss3"] - expected[2]) <= RTOL * expected[2], (got, expected)

    # back to one process from the world-2 checkpoint
    latest = st.latest_checkpoint(root)
    assert latest.name == "step_00000002"
    model = build(cfg, seed=321)
    opt = _optimizer(model)
    step, extra = st.load_train_state(latest, model, opt)
    assert step == 2 and extra["note"] == "from world 2" and extra["rng"].dtype == torch.uint8
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(buf, biases[name]), name
    loss3 = _train_step(model, opt, ids[2])
    assert abs(loss3 - expected[2]) <= RTOL * expected[2], (loss3, expected[2])


# ---------------------------------------------------------------------- checkpoint files (one process)
def test_checkpoint_atomic_keep_last_and_json_extra(tmp_path):
    cfg = nano()
    model = build(cfg)
    opt = _optimizer(model)
    _train_step(model, opt, batch(cfg))
    rng = torch.get_rng_state()
    extra = {"rng": rng, "loader": {"epoch": 1, "offset": [3, 4]}, "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)}
    for step in (1, 2, 3, 4):
        st.save_train_state(tmp_path, step, model, opt, extra, keep_last=2)
    assert [p.name for p in st.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    # an interrupted save (a .tmp directory, or a directory without its state file) is never "latest"
    (tmp_path / "step_00000009.tmp").mkdir()
    (tmp_path / "step_00000008").mkdir()
    assert st.latest_checkpoint(tmp_path).name == "step_00000004"
    assert st.latest_checkpoint(tmp_path / "missing") is None

    record = json.loads((tmp_path / "step_00000004" / st.STATE_FILE).read_text())
    assert record["step"] == 4 and record["world_size"] == 1
    other = build(cfg, seed=5)
    step, back = st.load_train_state(tmp_path / "step_00000004", other, _optimizer(other))
    assert step == 4 and torch.equal(back["rng"], rng) and back["loader"] == {"epoch": 1, "offset": [3, 4]}
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], extra["bf16"])
    with pytest.raises(TypeError, match="JSON-able"):
        st.save_train_state(tmp_path, 5, model, opt, {"bad": object()})
    assert not (tmp_path / "step_00000005.tmp").exists()


def test_checkpoint_restores_model_optimizer_and_bias_exactly(tmp_path):
    cfg = nano()
    model, opt = build(cfg), None
    opt = _optimizer(model)
    for s in (1, 2):
        _train_step(model, opt, batch(cfg, seed=s))
    path = st.save_train_state(tmp_path, 2, model, opt, {})
    other = build(cfg, seed=9)
    other_opt = _optimizer(other)
    st.load_train_state(path, other, other_opt)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    a, b = opt.state_dict(), other_opt.state_dict()
    # parameters without gradients (the indexer, unused here) have no AdamW state, before and after
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) < len(list(model.parameters()))
    for i, s in a["state"].items():
        for key, value in s.items():
            assert torch.equal(value, b["state"][i][key]), (i, key)
    assert a["param_groups"] == b["param_groups"]
    # model-only load (evaluation)
    third = build(cfg, seed=11)
    assert st.load_train_state(path, third)[0] == 2
    assert all(torch.equal(v, w) for v, w in zip(model.state_dict().values(), third.state_dict().values()))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_metadata_is_not_unpickled_blindly(tmp_path):
    cfg = nano()
    model = build(cfg)
    path = st.save_train_state(tmp_path, 1, model, None, {})
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        st.load_train_state(path, build(cfg))

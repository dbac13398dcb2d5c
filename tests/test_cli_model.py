"""The model-level CLI: `dsv32 info`, `dsv32 init`, `dsv32 demo` (in-process via cli.main, plus one subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dsv32 import ModelConfig, load_pretrained
from dsv32.cli import main
from dsv32.cli_model import build_random_model, greedy_with_cache, teacher_forced_logits


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, out, err, *fragments):
    assert rc == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------- info
def test_info_671b_totals(capsys):
    rc, out, _ = run(capsys, "info", "v3-671b")
    assert rc == 0
    assert "671.03B" in out and "671,026,419,200" in out
    assert "deepseek_v3" in out and "off (dense MLA)" in out
    assert "70,272 B/token" in out  # 61 x (512 + 64) x 2 bytes

    rc, out, _ = run(capsys, "info", "v3.2-671b")
    assert rc == 0
    assert "671.88B" in out and "671,877,944,064" in out
    assert "85,888 B/token" in out  # + the 128-wide indexer key per layer
    assert "indexer key 256" in out
    assert "0.1352338" in out  # 192^-1/2 x mscale(40)^2


def test_info_json_matches_config(capsys):
    rc, out, _ = run(capsys, "info", "v3.2-671b", "--json", "--context", "8192", "--dtype", "fp32")
    assert rc == 0
    facts = json.loads(out)
    cfg = ModelConfig.preset("v3.2-671b")
    assert facts["params_total"] == cfg.num_params() == 671_877_944_064
    assert facts["params_total_with_mtp"] == cfg.num_params(include_mtp=True)
    assert facts["params_active"] == cfg.num_active_params()
    assert abs(facts["params_active"] / 38.40e9 - 1) < 2e-3
    assert facts["kv_bytes_per_token"] == 61 * (512 + 64 + 128) * 4
    assert facts["kv_bytes_at_context"] == facts["kv_bytes_per_token"] * 8192
    assert sum(facts["kv_bytes_per_token_per_layer"].values()) * 61 == facts["kv_bytes_per_token"]
    assert facts["flops_per_token_at_context"] == cfg.flops_per_token(8192)
    assert facts["dsa"] is True and facts["layers"] == 61 and facts["moe_layers"] == 58
    assert facts["softmax_scale"] == pytest.approx(0.1352338, abs=1e-7)


def test_info_checkpoint_dir_equals_preset(capsys, tmp_path):
    ckpt = tmp_path / "nano"
    assert run(capsys, "init", "--preset", "nano", "--out", str(ckpt))[0] == 0
    rc, out_dir, _ = run(capsys, "info", str(ckpt), "--json")
    rc2, out_preset, _ = run(capsys, "info", "nano", "--json")
    assert rc == rc2 == 0
    from_dir, from_preset = json.loads(out_dir), json.loads(out_preset)
    assert from_dir.pop("source") == str(ckpt.resolve())
    assert from_preset.pop("source") == "preset nano"
    assert from_dir == from_preset


# ---------------------------------------------------------------------- init
def test_init_checkpoint_loads_with_same_logits(capsys, tmp_path):
    out = tmp_path / "ckpt"
    rc, stdout, _ = run(capsys, "init", "--preset", "nano", "--out", str(out), "--seed", "7")
    assert rc == 0 and "wrote nano" in stdout
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()

    loaded = load_pretrained(out, dtype=torch.float32).eval()
    reference = build_random_model(ModelConfig.preset("nano"), seed=7)
    other_seed = build_random_model(ModelConfig.preset("nano"), seed=8)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))  # 24 > index_topk=16
    with torch.no_grad():
        got, want = loaded(ids, return_mtp=True), reference(ids, return_mtp=True)
        other = other_seed(ids).logits
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.mtp_logits[0], want.mtp_logits[0])
    assert not torch.allclose(other, want.logits)


def test_init_is_deterministic_and_copies_tokenizer(capsys, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text("{}")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "init", "--preset", "nano", "--out", str(a), "--seed", "1", "--tokenizer", str(tok))[0] == 0
    assert run(capsys, "init", "--preset", "nano", "--out", str(b), "--seed", "1", "--dtype", "bfloat16")[0] == 0
    assert (a / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (a / "tokenizer_config.json").is_file() and not (b / "tokenizer.json").exists()
    from safetensors.torch import load_file

    fa, fb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert fa.keys() == fb.keys()
    assert fb["model.embed_tokens.weight"].dtype == torch.bfloat16
    for name in fa:  # same seed: the bf16 file is the fp32 file rounded
        assert torch.equal(fa[name].to(fb[name].dtype), fb[name]), name
    assert json.loads((b / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_init_fp8(capsys, tmp_path):
    out = tmp_path / "fp8"
    assert run(capsys, "init", "--preset", "nano", "--out", str(out), "--fp8")[0] == 0
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.q_b_proj.weight").get_dtype() == "F8_E4M3"
    assert "model.layers.0.self_attn.q_b_proj.weight_scale_inv" in names
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, fragments", [
    (["info", "no-such-preset"], ["unknown preset 'no-such-preset'", "v3.2-671b"]),
    (["info", "./missing/ckpt"], ["no such checkpoint directory"]),
    (["info", "tiny", "--dtype", "int3"], ["unknown dtype 'int3'"]),
    (["info", "tiny", "--context", "0"], ["--context"]),
    (["init", "--preset", "huge", "--out", "x"], ["unknown preset 'huge'"]),
    (["init", "--preset", "v3.2-671b", "--out", "x"], ["--force", "TiB"]),
    (["init", "--preset", "nano", "--out", "x", "--dtype", "float16"], ["unknown dtype 'float16'"]),
    (["init", "--preset", "nano", "--out", "x", "--tokenizer", "/no/such/tok"], ["no such tokenizer directory"]),
])
def test_bad_input_is_one_line(capsys, tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, *argv)
    assert_one_line_error(rc, out, err, *fragments)
    assert not (tmp_path / "x").exists()  # nothing written on refusal


def test_init_refuses_non_empty_out_and_bad_dir(capsys, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(*run(capsys, "init", "--preset", "nano", "--out", str(out)), "not empty", "--overwrite")
    assert os.listdir(out) == ["keep.txt"]
    assert run(capsys, "init", "--preset", "nano", "--out", str(out), "--overwrite")[0] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(*run(capsys, "info", str(empty)), "without a config.json")
    (empty / "config.json").write_text("{not json")
    assert_one_line_error(*run(capsys, "info", str(empty)), "not valid JSON")


def test_subprocess_entry_point(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(sys.executable), "dsv32")  # the console script `make demo` uses
    if not os.path.exists(script):
        pytest.skip("the dsv32 console script is not installed next to this interpreter")
    ok = subprocess.run([script, "info", "v3-671b", "--json"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["params_total"] == 671_026_419_200
    bad = subprocess.run([sys.executable, "-m", "dsv32.cli", "info", "bogus"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("dsv32 info: error: unknown preset 'bogus'")


# ---------------------------------------------------------------------- demo
def test_cached_greedy_equals_recomputation_past_topk():
    model = build_random_model(ModelConfig.preset("nano"), seed=2)
    prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    cached, cached_logits, _ = greedy_with_cache(model, prompt, 10)  # 22 tokens > index_topk=16
    full_logits = teacher_forced_logits(model, prompt, cached)
    assert cached == full_logits.argmax(-1).tolist()
    for a, b in zip(cached_logits, full_logits):
        torch.testing.assert_close(a[0], b, atol=1e-4, rtol=0)


def test_demo_runs(capsys):
    rc, out, _ = run(capsys, "demo", "--prompt-len", "24", "--new-tokens", "4", "--pretrain-steps", "0")
    assert rc == 0
    for name in ("v3.2-671b", "v3-671b", "coder", "lite", "tiny", "nano"):
        assert name in out
    assert "671.88B" in out and "671.03B" in out
    assert "identical: yes" in out and "PASS" in out

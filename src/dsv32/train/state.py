"""Training checkpoints: model + optimizer through torch.distributed.checkpoint (DCP), the rest as JSON.

Layout of one checkpoint (the directory name is the commit: it only appears by an atomic rename):

    <root>/step_00001000/
        .metadata, __0_0.distcp, __1_0.distcp, ...   DCP: model and optimizer tensors, one file per rank
        train_state.json                             step, world size, and the loop's `extra` dict

Written into `step_XXXXXXXX.tmp/` by every rank, then renamed by rank 0 after a barrier; the last
`keep_last` complete checkpoints are kept. `get_state_dict` names every tensor by its plain
parameter name and keeps DTensors sharded (FSDP shards, expert-parallel slices), and DCP records
each shard's offsets in the global tensor, so a checkpoint written at one world size / EP layout
loads at any other (world 2 FSDP+EP -> 1 process and back). The MoE balance biases
(`e_score_correction_bias`) are model buffers and travel with the model state.

No pickle is ever loaded. DCP itself stores its index (`.metadata`) as a pickle and loads it with
plain `pickle.load`, and reads non-tensor leaves (optimizer hyper-parameters) with
`torch.load(weights_only=False)`; `_SafeReader` / `_SafeLoadPlanner` replace both with an allow-list
unpickler and `weights_only=True`. `extra` is JSON; tensors inside it (RNG states) are stored as
base64 of their raw bytes.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from dsv32.train import distributed as du
from dsv32.train.allocator import retain_freed_memory

STATE_FILE = "train_state.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})$")


# ====================================================================== JSON with tensors


def encode_tensor(t: torch.Tensor) -> dict:
    """A tensor as JSON: dtype, shape and base64 of its bytes (exact, unlike a float list)."""
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return {"__tensor__": base64.b64encode(raw.numpy().tobytes()).decode("ascii"),
            "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}


def decode_tensor(d: dict) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a dtype: {d['dtype']!r}")
    raw = bytearray(base64.b64decode(d["__tensor__"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(d["shape"]).clone()


def to_json(obj):
    """Recursively replace tensors by `encode_tensor` dicts; reject anything JSON cannot hold."""
    if isinstance(obj, torch.Tensor):
        return encode_tensor(obj)
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint `extra` must be JSON-able (tensors allowed); got {type(obj).__name__}")


def from_json(obj):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return decode_tensor(obj)
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


# ====================================================================== pickle-free DCP reading


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` index, resolving only the few harmless globals it is made of."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    _EXACT = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
              ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"),
              ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._EXACT:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
            return getattr(torch, name)
        if module in self._MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type):   # the metadata dataclasses and enums; never a function
                return obj
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        # what the parent adds after its own pickle.load
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor leaves (lr, betas, ...) through the weights-only unpickler."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ====================================================================== listing


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary `.tmp` directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (a run's checkpoint directory), or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


# ====================================================================== save / load


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _alone() -> bool:
    """No process group: DCP then reads/writes everything from this process."""
    return not torch.distributed.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it is assuming one process; that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_train_state(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict | None = None,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `root/step_XXXXXXXX` (collective: every rank calls it). Returns its path.

    `extra`: JSON-able dict of the loop's own state (scheduler, data loader, RNG; tensors allowed),
    taken from rank 0, so it must describe the global state. `keep_last` <= 0 keeps everything.
    """
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    record = {"format": FORMAT_VERSION, "step": int(step), "world_size": du.world_size(),
              "extra": to_json(extra or {})}   # fail on every rank before any I/O if not JSON-able
    if du.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)                 # a crashed earlier attempt
        tmp.mkdir()
    du.barrier()

    with _quiet_single_process():
        dcp.save(_state(model, optimizer), storage_writer=FileSystemWriter(tmp), no_dist=_alone())

    if du.is_main():
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
    du.barrier()                               # every rank's shard file is on disk
    if du.is_main():
        if final.exists():                     # re-saving the same step replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    du.barrier()                               # nobody looks for the checkpoint before it exists
    return final


def read_train_state(ckpt: str | os.PathLike) -> dict:
    """The JSON record of a checkpoint: {"format", "step", "world_size", "extra"} (tensors decoded)."""
    with open(Path(ckpt) / STATE_FILE, encoding="utf-8") as f:
        record = json.load(f)
    record["extra"] = from_json(record.get("extra", {}))
    return record


def _saved_keys(reader: _SafeReader) -> set[str]:
    return set(reader.read_metadata().state_dict_metadata)


def load_train_state(
    ckpt: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[int, dict]:
    """Load a checkpoint written at any world size into `model` (and `optimizer`); returns (step, extra).

    Collective: every rank calls it, after parallelising the model exactly as for training.
    Optimizer state is restored for the parameters that had state when saved; parameters that never
    had a gradient stay without state, as they were in the uninterrupted run.
    """
    ckpt = Path(ckpt)
    record = read_train_state(ckpt)
    reader = _SafeReader(ckpt)
    saved = _saved_keys(reader)
    # DCP flattens nested keys with dots: "optim.state.<param fqn>.exp_avg"
    state = _state(model, optimizer)
    if optimizer is not None:
        # get_state_dict has just built state for *every* parameter (a zero-gradient step); keep
        # only what the checkpoint holds, so `load_state_dict` below recreates the saved state
        state["optim"]["state"] = {
            fqn: s for fqn, s in state["optim"]["state"].items()
            if all(f"optim.state.{fqn}.{k}" in saved for k in s)
        }
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=_alone())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        # strict=False lets parameters without saved state stay without state; the model keys are
        # already checked by dcp.load, which fails on any key the checkpoint lacks
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
    return int(record["step"]), record["extra"]


class ResumableTrainer:
    """The step loop, `save_checkpoint()` and `resume()` shared by the pretrain/SFT and GRPO trainers.

    The trainer has `run_dir`, `step`, `model`, `optimizer`, `scheduler`, `metrics` and a `cfg` with
    steps, eval_every, ckpt_every, keep_last, stop_after and progress; it implements `train_step()`,
    `evaluate()` and `finish()`, and adds what else it keeps through `_extra_state()` (saved beside
    the model and optimizer) and `_restore_extra(extra)`."""

    def _extra_state(self) -> dict:
        return {}

    def _restore_extra(self, extra: dict) -> None:
        pass

    def save_checkpoint(self) -> None:
        extra = {"scheduler": self.scheduler.state_dict(), **self._extra_state()}
        save_train_state(self.run_dir / "checkpoints", self.step, self.model, self.optimizer, extra,
                         keep_last=self.cfg.keep_last)

    def resume(self) -> bool:
        """Continue from the run's latest checkpoint; False when it has none."""
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            return False
        self.step, extra = load_train_state(ckpt, self.model, self.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        self._restore_extra(extra)
        self.metrics.truncate_after(self.step)
        return True

    def run_steps(self, desc: str, shown: tuple[str, ...], should_log=lambda record: True) -> dict:
        """Train to `cfg.steps` (or `cfg.stop_after`): evaluate, log, checkpoint on schedule, then
        `finish()` when the last step is done. Returns the last step's record."""
        cfg = self.cfg
        retain_freed_memory()  # every step reallocates the same large tensors: reuse, not fresh page faults
        progress = None
        if cfg.progress and getattr(self, "is_main", True):
            from tqdm import tqdm

            progress = tqdm(total=cfg.steps, initial=self.step, desc=desc, unit="step", dynamic_ncols=True)
        last: dict = {}
        while self.step < cfg.steps:
            record = self.train_step()
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                record.update(self.evaluate())
            if should_log(record):
                self.metrics.write(record)
            last = record
            if progress is not None:
                progress.update(1)
                progress.set_postfix({k: f"{record[k]:.3f}" for k in shown if k in record})
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
            if cfg.stop_after is not None and self.step >= cfg.stop_after:
                break
        if progress is not None:
            progress.close()
        if self.step == cfg.steps:
            self.finish()
        return last

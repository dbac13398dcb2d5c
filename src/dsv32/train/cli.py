"""`dsv32 train pretrain|sft`: every TrainConfig field is a flag; a JSON/TOML file can set them too.

Precedence: defaults < `--config FILE` < command-line flags. The resolved config is written to the
run directory. `--model-set key=value` overrides ModelConfig fields (values parsed as JSON).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from dsv32.train.config import TrainConfig

STAGE_DEFAULTS = {
    "pretrain": {"out": "runs/pretrain"},
    # SFT: a gentler, shorter schedule from a pretrained checkpoint; MTP and balance losses stay on
    "sft": {"out": "runs/sft", "lr": 5e-4, "warmup_steps": 10, "schedule": "cosine", "steps": 100},
}


def _flag_type(field: dataclasses.Field):
    hint = field.type if not isinstance(field.type, str) else eval(field.type, vars(typing), {})  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return "bool"
    if base in (int, float, str):
        return base
    return "json"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a JSON or TOML file of training settings")
    parser.add_argument("--resume", action="store_true", help="continue exactly from the run's latest checkpoint")
    parser.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field (value as JSON), e.g. --model-set num_hidden_layers=4")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("stage", "model"):
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field)
        if kind == "bool":
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind == "json":
            parser.add_argument(flag, dest=field.name, type=json.loads, default=None)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=None)


def config_from_args(stage: str, args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"stage", "model"}
    flags = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    base = {**STAGE_DEFAULTS[stage], "stage": stage}
    cfg = TrainConfig.from_file(args.config, **base) if args.config else TrainConfig(**base)
    cfg = dataclasses.replace(cfg, **flags)
    model = dict(cfg.model)
    for item in args.model_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model-set takes KEY=VALUE, got {item!r}")
        try:
            model[key] = json.loads(value)
        except json.JSONDecodeError:
            model[key] = value
    return dataclasses.replace(cfg, model=model)


# SFT's default data: the generators' chat, tool-use and reasoning (worked-solution) conversations
DEFAULT_SFT_SOURCES = ("tasks:arithmetic:2000", "tasks:word_problem:2000", "tasks:tool_use:2000")


def default_sft_data(cfg: TrainConfig) -> str:
    """Prepare (once) the default SFT mixture with the tokenizer that ships with the --init checkpoint."""
    from pathlib import Path

    from dsv32.data.prepare import prepare
    from dsv32.data.shards import MANIFEST

    tokenizer_dir = cfg.tokenizer or cfg.init
    if not (Path(tokenizer_dir) / "tokenizer.json").exists():
        raise ValueError(f"no tokenizer.json in {tokenizer_dir}: give --tokenizer DIR or --data DIR")
    data_dir = Path(cfg.out) / "data"
    if not (data_dir / MANIFEST).exists():
        prepare(list(DEFAULT_SFT_SOURCES), tokenizer_dir, data_dir, show_progress=cfg.progress)
    return str(data_dir)


def _run(stage: str):
    def run(args: argparse.Namespace) -> int:
        from dsv32.train.loop import Trainer

        cfg = config_from_args(stage, args)
        if stage == "sft" and not cfg.init:
            raise ValueError("sft starts from a pretrained checkpoint: give --init DIR")
        if stage == "sft" and not cfg.data:
            cfg = dataclasses.replace(cfg, data=default_sft_data(cfg))
        from dsv32.train import distributed as dist_utils

        trainer = Trainer(cfg)
        try:
            last = trainer.run(resume=args.resume)
        except BaseException:
            dist_utils.destroy(sync=False)
            raise
        dist_utils.destroy()
        if trainer.is_main and last:
            shown = {k: round(v, 4) for k, v in last.items() if k in ("loss", "val_loss", "val_bpb") and v is not None}
            print(f"{stage}: step {trainer.step}/{cfg.steps} {shown}; run directory {cfg.out}")
        return 0

    return run


def add_commands(sub) -> None:
    train = sub.add_parser("train", help="pretraining, SFT, GRPO and the R1 recipe")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, text in (("pretrain", "pretrain a model on a prepared corpus"),
                        ("sft", "supervised fine-tuning on prepared chat data (loss on assistant tokens only)")):
        parser = stages.add_parser(stage, help=text)
        _add_config_flags(parser)
        parser.set_defaults(func=_run(stage))
    from dsv32.train.grpo_cli import add_train_commands  # grpo, r1 (issue 7)

    add_train_commands(stages)

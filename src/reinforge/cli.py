"""`reinforge` command line: parse, load config, dispatch. No training logic lives here."""

from __future__ import annotations

import argparse
import sys

import yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reinforge", description="Preference and RL fine-tuning from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. learning_rate=1e-5 trl.beta=0.05")
    v = sub.add_parser("validate", help="print the resolved config, or the errors")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    pp = sub.add_parser("preprocess", help="prepare and cache the data; print counts, token lengths and examples")
    pp.add_argument("config")
    pp.add_argument("overrides", nargs="*")
    pp.add_argument("--examples", type=int, default=3, help="rows to render with their trained tokens marked")
    pp.add_argument("--tokens", action="store_true", help="show every token boundary in the examples")
    pp.add_argument("--rebuild", action="store_true", help="prepare again even when the cache has this data")
    c = sub.add_parser("convert-gguf", help="de-quantise a .gguf file into a Hugging Face model directory")
    c.add_argument("gguf")
    c.add_argument("out_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from reinforge.config import ConfigError, load_config
    from reinforge.data.errors import DataError

    try:
        if args.command == "convert-gguf":
            from reinforge.models.loading import convert_gguf

            print(convert_gguf(args.gguf, args.out_dir))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            print(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=False), sort_keys=False), end="")
            return 0
        from reinforge.rewards import RewardFunctionError, RewardLoadError
        if args.command == "preprocess":
            from reinforge.data.preview import preprocess

            return preprocess(cfg, examples=args.examples, tokens=args.tokens, rebuild=args.rebuild)
        from reinforge.training.setup import RunError, setup_logging

        setup_logging()
        from reinforge.training.dispatch import train

        try:
            train(cfg)
        except (RunError, RewardFunctionError, RewardLoadError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

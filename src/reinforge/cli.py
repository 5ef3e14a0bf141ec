"""`reinforge` command line: parse, load config, dispatch. No training logic lives here."""

from __future__ import annotations

import argparse
import os
import sys

import yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reinforge", description="Preference and RL fine-tuning from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. learning_rate=1e-5 trl.beta=0.05")
    t.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="train on N processes on this machine (data parallel; gloo on CPU, NCCL on GPUs): re-launches "
                        "itself N times with torchrun's environment, like `torchrun --nproc-per-node N -m "
                        "reinforge.cli train ...`")
    t.add_argument("--debug", action="store_true", help="on an error, print the full traceback (and the sample a "
                                                        "reward function failed on) before the one-line message; "
                                                        "also REINFORGE_DEBUG=1")
    v = sub.add_parser("validate", help="print the resolved config, or every error found before training (models, "
                                        "data, dataset types, reward/rollout functions, the run)")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    pp = sub.add_parser("preprocess", help="prepare and cache the data; print counts, token lengths and examples")
    pp.add_argument("config")
    pp.add_argument("overrides", nargs="*")
    pp.add_argument("--examples", type=int, default=3, help="rows to render with their trained tokens marked")
    pp.add_argument("--tokens", action="store_true", help="show every token boundary in the examples")
    pp.add_argument("--rebuild", action="store_true", help="prepare again even when the cache has this data")
    vs = sub.add_parser("vllm-serve", help="start a vLLM server for the config's model (trl.use_vllm: true trains against it)")
    vs.add_argument("config")
    vs.add_argument("overrides", nargs="*")
    c = sub.add_parser("convert-gguf", help="de-quantise a .gguf file into a Hugging Face model directory")
    c.add_argument("gguf")
    c.add_argument("out_dir")
    r = sub.add_parser("report", help="(re)write OUTPUT_DIR/report: PNG plots of metrics.jsonl and an index.html")
    r.add_argument("output_dir")
    _add_merge_inference_parsers(sub)
    return p


EXIT_OK, EXIT_RUN_ERROR, EXIT_CONFIG_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130  # 143 after SIGTERM


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 the run could not start or continue (the message says why, e.g. non-finite
    steps, reward function errors); 2 invalid config or data; 130 (SIGINT) / 143 (SIGTERM) interrupted after
    writing a checkpoint (the message gives the command that resumes), or 130 when stopped at once by a
    second Ctrl-C (143 for a second SIGTERM)."""
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:
        if os.environ.get("RANK", "0") == "0":
            print("\nreinforge: stopped at once; no checkpoint was written for the current step (the latest complete "
                  "checkpoint in output_dir still resumes with resume_from_checkpoint=true)", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from reinforge.config import ConfigError, load_config
    from reinforge.config.preflight import preflight
    from reinforge.data.errors import DataError
    from reinforge.user_code import debug_enabled

    if getattr(args, "debug", False):
        os.environ["REINFORGE_DEBUG"] = "1"  # processes started by --num-processes inherit it
    debug = debug_enabled()

    if args.command == "report":
        from reinforge.training.report import ReportError, write_report

        try:
            print(write_report(args.output_dir))
        except (ReportError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        return EXIT_OK
    try:
        if args.command == "convert-gguf":
            from reinforge.models.loading import convert_gguf

            print(convert_gguf(args.gguf, args.out_dir))
            return 0
        cfg = load_config(args.config, args.overrides)
        preflight(cfg, args.command, args.config)
        if args.command == "validate":
            print(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=False), sort_keys=False), end="")
            return 0
        if args.command in ("merge-lora", "inference"):
            return _merge_or_inference(args, cfg)
        if args.command == "vllm-serve":
            from reinforge.serving.vllm_serve import ServeError, serve

            try:
                return serve(cfg)
            except ServeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_RUN_ERROR
        from reinforge.rewards import RewardFunctionError, RewardLoadError
        if args.command == "preprocess":
            from reinforge.data.preview import preprocess

            return preprocess(cfg, examples=args.examples, tokens=args.tokens, rebuild=args.rebuild)
        from reinforge.training.distributed import launched_world_size, relaunch

        n = args.num_processes
        if n is not None and (n < 1 or launched_world_size() not in (1, n)):
            print(f"error: --num-processes {n} does not match the {launched_world_size()} processes of the launcher "
                  f"(or is < 1)", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        if n is not None and n > 1 and launched_world_size() == 1:
            return relaunch(n, ["train", args.config, *args.overrides])
        from reinforge.training.setup import RunError, setup_logging
        from reinforge.training.signals import TrainingInterrupted

        setup_logging()
        from reinforge.training.dispatch import train

        try:
            train(cfg)
        except TrainingInterrupted as exc:
            if os.environ.get("RANK", "0") == "0":
                print(f"reinforge: {exc}", file=sys.stderr)
            return exc.exit_code
        except (RunError, RewardFunctionError, RewardLoadError) as exc:
            _print_error(exc, debug)
            return EXIT_RUN_ERROR
        return EXIT_OK
    except (ConfigError, DataError) as exc:
        _print_error(exc, debug)
        return getattr(exc, "exit_code", EXIT_CONFIG_ERROR)  # preflight: 1 when only the run's state is at fault


def _print_error(exc: Exception, debug: bool) -> None:
    """`error: ...` as the last line on stderr (a user code error: one line); with --debug / REINFORGE_DEBUG=1 the
    sample and traceback of the user's code (`detail`) and reinforge's own traceback come first."""
    import traceback

    from reinforge.user_code import UserCodeError

    if debug:
        if detail := getattr(exc, "detail", None):
            print(detail.rstrip(), file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {exc.what if isinstance(exc, UserCodeError) else exc}", file=sys.stderr)


def _overrides_anywhere(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept KEY=VALUE overrides after the flags too (`CONFIG --prompt hi trl.top_k=5`): argparse gives the
    `overrides` positional only the words before the first flag."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = parse(args, namespace)
        late = [a for a in extras if "=" in a and not a.startswith("-")]
        ns.overrides = [*ns.overrides, *late]
        return ns, [a for a in extras if a not in late]

    parser.parse_known_args = parse_known_args
    return parser


def _add_merge_inference_parsers(sub) -> None:
    """`merge-lora` and `inference` (Axolotl's commands after training)."""
    lora_help = "the adapter directory (default: the config's output_dir, where `reinforge train` saves it)"
    m = _overrides_anywhere(sub.add_parser("merge-lora", help="merge the trained LoRA adapter into the base model; "
                                                            "save the full model in output_dir/merged"))
    m.add_argument("config")
    m.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. bf16=true")
    m.add_argument("--lora-model-dir", "--lora_model_dir", dest="lora_model_dir", default=None, metavar="DIR",
                   help=lora_help)
    i = _overrides_anywhere(sub.add_parser("inference", help="chat with the trained model (streamed; --prompt answers "
                                                           "once)"))
    i.add_argument("config")
    i.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. chat_template=chatml")
    i.add_argument("--prompt", default=None, help="answer this message and exit (default: chat, reading stdin)")
    i.add_argument("--lora-model-dir", "--lora_model_dir", dest="lora_model_dir", default=None, metavar="DIR",
                   help=lora_help)
    i.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="default: trl.max_completion_length")
    i.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="default: trl.temperature; 0 decodes greedily")
    i.add_argument("--top-p", type=float, default=None, metavar="P", help="default: trl.top_p")
    i.add_argument("--top-k", type=int, default=None, metavar="K", help="default: trl.top_k (0: off)")


def _merge_or_inference(args: argparse.Namespace, cfg) -> int:
    """Run `merge-lora` or `inference`; ConfigError propagates (exit 2), a missing adapter is exit 1."""
    from reinforge.config import ConfigError
    from reinforge.models.merge import ArtifactError

    try:
        if args.command == "merge-lora":
            from reinforge.models.merge import merge_lora

            print(merge_lora(cfg, args.lora_model_dir, config_path=args.config))
            return EXIT_OK
        from reinforge.models.inference import generation_settings, run_inference

        try:
            settings = generation_settings(cfg, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                           top_p=args.top_p, top_k=args.top_k)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        return run_inference(cfg, prompt=args.prompt, lora_model_dir=args.lora_model_dir, settings=settings,
                             config_path=args.config)
    except ConfigError:
        raise
    except (ArtifactError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUN_ERROR


if __name__ == "__main__":
    sys.exit(main())

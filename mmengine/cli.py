"""The ``mmengine`` command: ``mmengine serve MODEL [options]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmengine import __version__
from mmengine.default_model import default_model_path

# The model served when none is named: the embedded shapes captioner (no download; see
# mmengine/assets/default_model/README.md). Should the folder be missing (a trimmed
# install), a model must be named.
_EMBEDDED = default_model_path()
DEFAULT_MODEL: str | None = _EMBEDDED if Path(_EMBEDDED, "config.json").is_file() else None
# The name clients use for it (in place of its folder path) unless --served-model-name is given.
DEFAULT_SERVED_NAME = "mmengine-default"


def make_parser() -> argparse.ArgumentParser:
    from mmengine.server.args import add_engine_args, add_server_args

    parser = argparse.ArgumentParser(
        prog="mmengine", description="mmengine: a multimodal LLM inference engine."
    )
    parser.add_argument("--version", action="version", version=f"mmengine {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="Serve a model over an OpenAI-compatible HTTP API.",
        description="Serve a model over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).",
    )
    serve.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help="HuggingFace checkpoint folder, or a hub id found in the local HF cache. "
        + (
            "Default: the embedded default model, a 2.3M-parameter Qwen2-VL that captions "
            f"pictures and clips of coloured shapes ({DEFAULT_MODEL}), served as "
            f"'{DEFAULT_SERVED_NAME}' on one CPU thread unless --served-model-name / "
            "--cpu-threads say otherwise."
            if DEFAULT_MODEL
            else "Required."
        ),
    )
    server = serve.add_argument_group("server")
    add_server_args(server)  # type: ignore[arg-type]
    engine = serve.add_argument_group("engine")
    add_engine_args(engine)  # type: ignore[arg-type]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.model is None:
            parser.error(
                "a model is required: mmengine serve MODEL, where MODEL is a HuggingFace "
                "checkpoint folder or a hub id in the local HF cache"
            )
        if args.model == DEFAULT_MODEL:
            if args.served_model_name is None:
                args.served_model_name = [DEFAULT_SERVED_NAME]
            if getattr(args, "cpu_threads", None) is None:  # absent unless given
                # Its matrices are 192 wide: on CPU more threads only add overhead (one
                # is ~10x faster than two on a busy 2-core machine).
                args.cpu_threads = 1
        from mmengine.server.api_server import run_server
        from mmengine.server.args import engine_config_from_args

        try:  # option values the flags' types let through but the engine refuses
            engine_config_from_args(args)
        except ValueError as e:
            parser.error(str(e))
        return run_server(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""`tts-server`: up | gateway | prm-worker | policy | prepare-model | hash-key, and the offline
tools' eval | calibrate | plot | report | dashboards (registered by tts_server/tools/cli.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from pydantic import ValidationError

from tts_server.api.keys_file import KeysFileError
from tts_server.prompting import ProfileError
from tts_server.router import RouterTableError
from tts_server.settings import Settings


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def cmd_up(args: argparse.Namespace) -> int:
    from tts_server.launch.prm import plan_prm
    from tts_server.launch.replicas import plan_replicas
    from tts_server.launch.stack import run_stack
    from tts_server.launch.vllm import LaunchError

    settings = _settings(
        host=args.host,
        port=args.port,
        policy_port=args.policy_port,
        prm_port=args.prm_port,
        prm_backend=args.prm_backend,
        prm_model=args.prm_model,
        prm_vllm_url=args.prm_vllm_url,
        prm_vllm_port=args.prm_vllm_port,
        policy_url=args.policy_url,
        policy_model=args.policy_model,
        policy_replicas=args.replicas,
    )
    start_policy = args.policy_url is None
    replicas = None
    try:  # before anything starts
        prm = plan_prm(settings)
        if settings.policy_replicas > 1:
            if not start_policy:
                raise LaunchError("--replicas starts local vLLM replicas: drop --policy-url")
            replicas = plan_replicas(settings)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if start_policy:
        settings = settings.model_copy(
            update={"policy_url": f"http://127.0.0.1:{settings.policy_port}"}
        )
    return run_stack(settings, prm, start_policy=start_policy, replicas=replicas)


def cmd_gateway(args: argparse.Namespace) -> int:
    from tts_server.api.app import create_app
    from tts_server.api.serve import serve, serve_workers

    settings = _settings(
        host=args.host,
        port=args.port,
        policy_url=args.policy_url,
        prm_url=args.prm_url,
        policy_model=args.policy_model,
        workers=args.workers,
    )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.workers > 1:
        serve_workers(settings)
    else:
        serve(create_app(settings), settings)
    return 0


def cmd_prm_worker(args: argparse.Namespace) -> int:
    if args.list:  # the same listing as `python -m tts_server.prm_worker --list`, without a fork
        from tts_server.prm_worker.backends import registry

        print(registry.shipped().listing())
        return 0
    settings = _settings(
        prm_port=args.port,
        prm_backend=args.backend,
        prm_model_path=args.model,
        prm_vllm_url=args.vllm_url,
        prm_name=args.prm,
        prm_judge_url=args.judge_url,
        prm_judge_mode=args.judge_mode,
        prm_judge_top_logprobs=args.top_logprobs,
    )
    argv = [
        sys.executable,
        "-m",
        "tts_server.prm_worker",
        "--backend",
        settings.prm_backend,
        "--host",
        args.host,
        "--port",
        str(settings.prm_port),
    ]
    model, judge_url = settings.prm_model_path, settings.prm_judge_url
    if settings.prm_backend == "judge":  # unless told otherwise, the policy judges its own steps
        model, judge_url = model or settings.policy_model, judge_url or settings.policy_url
    if model:
        argv += ["--model", model]
    if settings.prm_vllm_url:
        argv += ["--vllm-url", settings.prm_vllm_url]
    for flag, value in (
        ("--judge-url", judge_url),
        ("--judge-mode", settings.prm_judge_mode),
        ("--top-logprobs", settings.prm_judge_top_logprobs),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if settings.prm_name and settings.prm_backend in ("hf", "vllm"):  # arith has no model
        argv += ["--prm", settings.prm_name]
    if settings.prm_veto and "--veto" not in args.passed:
        argv += ["--veto", settings.prm_veto]
    # The worker's own options (`python -m tts_server.prm_worker --help`) pass through as given:
    # one list of them, the worker's, not a copy here that falls behind.
    os.execv(sys.executable, [*argv, *args.passed])
    return 0  # pragma: no cover - execv does not return


def cmd_policy(args: argparse.Namespace) -> int:
    from tts_server.launch.vllm import LaunchError, exec_policy_server

    settings = _settings(policy_model=args.served_model_name, policy_model_path=args.model)
    try:
        exec_policy_server(settings, args.port or settings.policy_port)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0  # pragma: no cover


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from tts_server.launch.vllm import LaunchError, ensure_model

    try:
        print(ensure_model(_settings()))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from tts_server.api.reliability import hash_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        print("error: give a key as an argument or on standard input", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tts-server",
        description="Test-time-scaling inference server. "
        "Every setting also reads TTS_<NAME> from the environment.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start vLLM, the PRM worker and the gateway; Ctrl-C stops all")
    up.add_argument("--host", default=None, help="gateway host (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default 8000)")
    up.add_argument("--policy-port", type=int, default=None, help="local vLLM port (default 8100)")
    up.add_argument("--prm-port", type=int, default=None, help="PRM worker port (default 8200)")
    up.add_argument("--prm-backend", default=None, help="PRM backend: arith (default), hf, vllm")
    up.add_argument(
        "--prm-model", default=None, help="hf, vllm: the PRM's model folder (vllm: or hub id)"
    )
    up.add_argument(
        "--prm-vllm-url", default=None, help="vllm: use this PRM vLLM server, start none"
    )
    up.add_argument(
        "--prm-vllm-port", type=int, default=None, help="vllm: the PRM vLLM's port (8300)"
    )
    up.add_argument(
        "--policy-url", default=None, help="use an existing vLLM server instead of starting one"
    )
    up.add_argument("--policy-model", default=None, help="served model name of the policy")
    up.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="vLLM replicas of the policy behind vllm-router on the policy port (default 1)",
    )
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="run the OpenAI-compatible gateway")
    gw.add_argument("--host", default=None)
    gw.add_argument("--port", type=int, default=None)
    gw.add_argument(
        "--policy-url", default=None, help="vLLM base URL (default http://127.0.0.1:8100)"
    )
    gw.add_argument(
        "--prm-url", default=None, help="PRM worker base URL (default http://127.0.0.1:8200)"
    )
    gw.add_argument("--policy-model", default=None, help="served model name of the policy")
    gw.add_argument(
        "--workers", type=int, default=None, help="uvicorn worker processes (default 1)"
    )
    gw.set_defaults(func=cmd_gateway)

    prm = sub.add_parser(
        "prm-worker",
        help="run the PRM worker",
        epilog="Any other option goes to the worker as given (--veto, --cache-size, the vllm "
        "backend's --tokenizer, ...): see `python -m tts_server.prm_worker --help`.",
    )
    prm.add_argument("--host", default="127.0.0.1")
    prm.add_argument("--port", type=int, default=None)
    prm.add_argument("--backend", default=None, help="arith (default), hf, vllm or judge")
    prm.add_argument(
        "--model", default=None, help="hf: the model folder; vllm: the PRM's served model name"
    )
    prm.add_argument("--vllm-url", default=None, help="vllm: the PRM's vLLM server")
    prm.add_argument(
        "--prm", default=None, help="hf, vllm: a PRM of the registry, by name or model id"
    )
    prm.add_argument("--list", action="store_true", help="print the registry's PRMs and exit")
    prm.add_argument(
        "--judge-url", default=None, help="judge: an OpenAI-compatible endpoint (the policy's)"
    )
    prm.add_argument("--judge-mode", default=None, help="judge: step (default) or solution")
    prm.add_argument("--top-logprobs", type=int, default=None, help="judge: candidates (20)")
    prm.set_defaults(func=cmd_prm_worker, passes_through=True)

    pol = sub.add_parser("policy", help="run a local vLLM CPU server (embedded SmolLM2 by default)")
    pol.add_argument("--port", type=int, default=None)
    pol.add_argument("--model", default=None, help="Hugging Face model folder (default: embedded)")
    pol.add_argument("--served-model-name", default=None)
    pol.set_defaults(func=cmd_policy)

    prep = sub.add_parser("prepare-model", help="prepare the embedded SmolLM2 folder once")
    prep.set_defaults(func=cmd_prepare_model)

    hk = sub.add_parser(
        "hash-key",
        help="print the SHA-256 of an API key, for TTS_API_KEY_HASHES or TTS_API_KEYS_FILE",
    )
    hk.add_argument("key", nargs="?", default=None, help="the key (default: read from stdin)")
    hk.set_defaults(func=cmd_hash_key)

    try:
        from tts_server.tools.cli import add_tool_commands
    except ModuleNotFoundError as exc:
        # The gateway image leaves tts_server/tools out (Dockerfile): serve without the tools.
        if exc.name not in ("tts_server.tools", "tts_server.tools.cli"):
            raise
    else:
        add_tool_commands(sub)

    return parser


def settings_problems(exc: ValidationError) -> list[str]:
    """One line per bad setting, named as the environment variable that sets it. The value is
    not repeated: a setting may hold a secret."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        lines.append(f"TTS_{field.upper()}: {error['msg']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, passed = parser.parse_known_args(argv)
    if passed and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(passed)}")
    args.passed = passed  # the PRM worker's own options, given to it as they are
    try:
        result: int = args.func(args)
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        for line in settings_problems(exc):
            print(f"error: invalid setting {line}", file=sys.stderr)
        return 2
    except (ProfileError, RouterTableError, KeysFileError) as exc:  # found at start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())

"""The `longserve` command line. Engine flags are named as vLLM's."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from attention_backends.base import NoParams
from attention_backends.calibration import DEFAULT_MAX_TOKENS
from engine.config import EngineConfig
from engine.model_loader import EMBEDDED_NAME
from server.config import ServedModel, ServerConfig, api_keys_from, read_config_file, served_models_from
from server.extensions import ServerExtension, server_extensions


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="local HF directory or .gguf file (default: embedded SmolLM2-135M)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--kv-cache-memory", type=float, default=d.kv_cache_memory, help="GiB of K/V cache")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-memory")
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--long-prefill-token-threshold", type=int, default=0)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-cpu-prepacked-weights", dest="cpu_prepacked_weights", action="store_false",
                   help="float32 on the CPU: no second copy of the linear weights in oneDNN's layout (saves their "
                        "size in memory; prefill 3-5%% slower)")
    g.add_argument("--attention-backend", default=d.attention_backend)
    g.add_argument("--attention-params", type=json.loads, default={}, help="JSON object of backend params")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto (CUDA where a GPU is found), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default=d.dtype, help="auto, float32, bfloat16 or float16")


def add_server_args(parser: argparse.ArgumentParser, extensions: list[ServerExtension]) -> None:
    d = ServerConfig(EngineConfig(), [ServedModel("-", "dense", NoParams())])
    parser.add_argument("--config", default=None, help="YAML with these settings and `served_models`; flags win")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host)
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--api-key", action="append", default=None,
                   help="required as `Authorization: Bearer KEY` on every route but /health; repeatable; "
                        "LONGSERVE_API_KEY adds comma-separated keys")
    g.add_argument("--served-model-name", default=None, help="name of the served model when the config lists none")
    g.add_argument("--allowed-origins", type=json.loads, default=[],
                   help='JSON list of CORS origins, e.g. \'["https://app.example"]\'; none: CORS off')
    g.add_argument("--max-num-queued-tokens", type=int, default=d.max_num_queued_tokens,
                   help="prompt tokens that may wait for prefill before new requests get 429")
    g.add_argument("--max-n-sequences", type=int, default=d.max_n_sequences,
                   help="cap on n times the number of prompts in one request")
    g.add_argument("--max-logprobs", type=int, default=d.max_logprobs)
    g.add_argument("--max-request-body-bytes", type=int, default=d.max_request_body_bytes,
                   help="413 above this; 0: 64 bytes per token of max_model_len, at least 2 MiB")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds to drain in-flight requests after SIGTERM")
    g.add_argument("--uvicorn-log-level", default="info")
    for ext in extensions:
        ext.add_args(parser)


def server_config_from_args(args: argparse.Namespace, served_models: list[dict] | None,
                            extensions: list[ServerExtension]) -> ServerConfig:
    engine = engine_config_from_args(args)
    for ext in extensions:
        ext.configure(args)
    default_name = args.served_model_name or (Path(engine.model).stem if engine.model else EMBEDDED_NAME)
    return ServerConfig(
        engine=engine, served_models=served_models_from(served_models, default_name, engine), host=args.host,
        port=args.port, api_keys=api_keys_from(args.api_key), allowed_origins=args.allowed_origins,
        max_num_queued_tokens=args.max_num_queued_tokens, max_n_sequences=args.max_n_sequences,
        max_logprobs=args.max_logprobs, max_request_body_bytes=args.max_request_body_bytes,
        shutdown_timeout=args.shutdown_timeout, extensions=extensions,
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)})


def _serve(args: argparse.Namespace) -> int:
    from server.launch import serve

    return serve(server_config_from_args(args, args.served_models, args.extensions), args.uvicorn_log_level)


def _parse(parser: argparse.ArgumentParser, serve_parser: argparse.ArgumentParser, argv: list[str] | None
           ) -> argparse.Namespace:
    """Flags, with a --config file's values as their defaults (so a flag on the command line wins)."""
    args = parser.parse_args(argv)
    args.served_models = None
    if getattr(args, "config", None):
        values = read_config_file(args.config)
        served = values.pop("served_models", None)
        unknown = sorted(set(values) - (set(vars(args)) - {"command", "func", "extensions"}))  # flags only
        if unknown:
            raise ValueError(f"{args.config}: unknown settings {', '.join(unknown)}")
        serve_parser.set_defaults(**values)
        args = parser.parse_args(argv)
        args.served_models = served
    return args


def _generate(args: argparse.Namespace) -> int:
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(engine_config_from_args(args))
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.sampling_seed)
    engine.add_request(prompt, sampling)
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from attention_backends.calibration import CalibratedBackend, calibrate
    from attention_backends.kernels.paged import cdiv
    from attention_backends.registry import validate_params
    from engine.llm_engine import LLMEngine

    params = validate_params(args.backend, {**args.attention_params, "calibration": None})
    # The engine only lends its model and geometry: a KV pool just large enough for its length.
    n = args.max_tokens + 1
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_model_len=n,
                                    block_size=args.block_size, num_kv_blocks=cdiv(n, args.block_size) + 1))
    impl = engine.backend(args.backend)
    if not isinstance(impl, CalibratedBackend):
        raise ValueError(f"backend {args.backend!r} needs no calibration")
    impl.check(params)
    text = Path(args.data).read_text() if args.data else None
    path, _ = calibrate(engine.calibration, impl, params, text, args.max_tokens,
                        Path(args.output) if args.output else None)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longserve", description="long-context LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion offline, streamed to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    extensions = server_extensions()
    add_server_args(srv, extensions)
    add_engine_args(srv)
    srv.set_defaults(func=_serve, extensions=extensions)
    cal = sub.add_parser("calibrate", help="make a backend's calibration artifact (Loki's PCA, TCA's head budgets)")
    cal.add_argument("--backend", required=True)
    cal.add_argument("--model", default=None, help="local HF directory or .gguf file (default: embedded SmolLM2-135M)")
    cal.add_argument("--data", default=None, help="calibration text file (default: the text bundled with longserve)")
    cal.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens of the text the model reads")
    cal.add_argument("--block-size", type=int, default=EngineConfig.block_size,
                     help="the KV cache block of the server that will load the artifact (TCA's budgets depend on it)")
    cal.add_argument("--attention-params", type=json.loads, default={}, help="JSON object of backend params")
    cal.add_argument("--output", default=None, help="artifact path (default: the cache, where the server looks)")
    cal.add_argument("--device", default="auto")
    cal.add_argument("--dtype", default="auto")
    cal.set_defaults(func=_calibrate)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = _parse(parser, srv, argv)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

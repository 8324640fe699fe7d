"""The `longserve` command line. Engine flags are named as vLLM's."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from attention_backends.base import NoParams
from engine.config import EngineConfig
from engine.model_loader import EMBEDDED_NAME
from server.config import ServedModel, ServerConfig, api_keys_from, read_config_file, served_models_from


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
    g.add_argument("--attention-backend", default=d.attention_backend)
    g.add_argument("--attention-params", type=json.loads, default={}, help="JSON object of backend params")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto (CUDA where a GPU is found), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default=d.dtype, help="auto, float32, bfloat16 or float16")


def add_server_args(parser: argparse.ArgumentParser) -> None:
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
    g = parser.add_argument_group("star attention across ranks")
    g.add_argument("--star-world-size", type=int, default=d.star_world_size,
                   help="ranks that `star` requests shard their context over; N > 1 starts N - 1 worker processes "
                        "here, each pinned to its share of the cores (under torchrun: the ranks torchrun starts)")
    g.add_argument("--star-timeout", type=float, default=d.star_timeout,
                   help="seconds a rank may keep the others waiting in a step before star requests fail with 503")
    g.add_argument("--star-port", type=int, default=d.star_port,
                   help="rank 0's rendezvous port on MASTER_ADDR when started under torchrun")


def server_config_from_args(args: argparse.Namespace, served_models: list[dict] | None) -> ServerConfig:
    engine = engine_config_from_args(args)
    default_name = args.served_model_name or (Path(engine.model).stem if engine.model else EMBEDDED_NAME)
    return ServerConfig(
        engine=engine, served_models=served_models_from(served_models, default_name, engine), host=args.host,
        port=args.port, api_keys=api_keys_from(args.api_key), allowed_origins=args.allowed_origins,
        max_num_queued_tokens=args.max_num_queued_tokens, max_n_sequences=args.max_n_sequences,
        max_logprobs=args.max_logprobs, max_request_body_bytes=args.max_request_body_bytes,
        shutdown_timeout=args.shutdown_timeout, star_world_size=args.star_world_size,
        star_timeout=args.star_timeout, star_port=args.star_port,
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)})


def _serve(args: argparse.Namespace) -> int:
    from server.launch import serve

    return serve(server_config_from_args(args, args.served_models), args.uvicorn_log_level)


def _parse(parser: argparse.ArgumentParser, serve_parser: argparse.ArgumentParser, argv: list[str] | None
           ) -> argparse.Namespace:
    """Flags, with a --config file's values as their defaults (so a flag on the command line wins)."""
    args = parser.parse_args(argv)
    args.served_models = None
    if getattr(args, "config", None):
        values = read_config_file(args.config)
        served = values.pop("served_models", None)
        unknown = sorted(set(values) - set(vars(args)) - {"config", "command", "func"})
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
    from attention_backends.calibrated import CalibratedBackend
    from attention_backends.registry import validate_params
    from engine import calibration
    from engine.llm_engine import LLMEngine

    params = validate_params(args.backend, {**args.attention_params, "calibration": None})
    n = args.max_tokens + 16
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_model_len=n,
                                    num_kv_blocks=n // 16 + 2))
    impl = engine.runner.backend(args.backend)
    if not isinstance(impl, CalibratedBackend):
        raise ValueError(f"backend {args.backend!r} needs no calibration")
    impl.check(params)
    text = Path(args.data).read_text() if args.data else calibration.CALIBRATION_TEXT.read_text()
    tensors = calibration.run_calibration(engine.loaded, impl, params, text, args.max_tokens)
    path = Path(args.output) if args.output else calibration.artifact_path(args.backend, engine.loaded.fingerprint,
                                                                           params)
    calibration.save_artifact(path, tensors, args.backend, engine.loaded.fingerprint, params, text, args.max_tokens)
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
    add_server_args(srv)
    add_engine_args(srv)
    srv.set_defaults(func=_serve)
    cal = sub.add_parser("calibrate", help="make a backend's calibration artifact (Loki's PCA, TCA's head budgets)")
    cal.add_argument("--backend", required=True)
    cal.add_argument("--model", default=None, help="local HF directory or .gguf file (default: embedded SmolLM2-135M)")
    cal.add_argument("--data", default=None, help="calibration text file (default: the text bundled with longserve)")
    cal.add_argument("--max-tokens", type=int, default=4096, help="tokens of the text the model reads")
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

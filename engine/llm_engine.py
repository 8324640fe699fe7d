"""LLMEngine: the engine loop. `add_request`, `abort`, `step`, `generate`."""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from tqdm import tqdm

from attention_backends.base import AttentionBackend, BackendUnavailable, NoParams
from attention_backends.calibration import CalibratedBackend, CalibrationModel, obtain
from attention_backends.context import AttentionSpec
from attention_backends.kernels.paged import cdiv
from attention_backends.registry import BackendError, validate_params
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.hooks import EngineHook
from engine.model_loader import LoadedModel, layer_windows, load_model
from engine.model_runner import ModelRunner, StepResult
from engine.sampler import Sampler, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from kv_cache.block_pool import BlockPool, PoolUsage
from kv_cache.manager import KVCacheManager
from kv_cache.paged_kv import KVSpec, PagedKVCache

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed while running a step that held this request."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause

    @property
    def unavailable(self) -> bool:
        """The request needed something the server has lost (a rank of a backend's group): a 503, not a 500."""
        return isinstance(self.cause, BackendUnavailable)


class ContextLengthError(ValueError):
    """Prompt plus requested output do not fit the model's context; the message reads as vLLM's."""

    def __init__(self, max_model_len: int, prompt_len: int, max_tokens: int | None) -> None:
        self.max_model_len, self.prompt_len, self.max_tokens = max_model_len, prompt_len, max_tokens
        if max_tokens is None or prompt_len >= max_model_len:
            detail = (f"However, your prompt contains {prompt_len} input tokens, which exceeds this limit even "
                      "without any output tokens. Please reduce the length of the input prompt.")
        else:
            detail = (f"However, you requested {max_tokens} output tokens and your prompt contains {prompt_len} "
                      f"input tokens, for a total of {prompt_len + max_tokens} tokens. Please reduce the length "
                      "of the input prompt or the number of requested output tokens.")
        super().__init__(f"This model's maximum context length is {max_model_len} tokens. {detail}")


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and totals so far."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]  # all output tokens so far
    text: str  # all output text so far
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # for new_token_ids, when asked


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None,
                 hooks: Iterable[EngineHook] = ()) -> None:
        self.config = config = config or EngineConfig()
        self.loaded = loaded or load_model(config.model, config.device, dtype=config.dtype,
                                           prepack=config.cpu_prepacked_weights)
        hf = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        model_len = hf.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        weights = next(self.loaded.model.parameters())
        kv_spec = KVSpec(hf.num_hidden_layers, hf.num_key_value_heads, head_dim, config.block_size, weights.dtype)
        num_blocks = config.num_kv_blocks or kv_spec.blocks_for_memory(config.kv_cache_memory)
        fits = (num_blocks - 1) * config.block_size
        if fits < self.max_model_len:
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit in the KV pool ({num_blocks} blocks of "
                f"{config.block_size} tokens, one reserved); the largest length that fits is {fits}: lower "
                "--max-model-len or raise --kv-cache-memory / --num-kv-blocks"
            )
        self.pool = BlockPool(num_blocks, enable_caching=config.enable_prefix_caching)
        self.kv = PagedKVCache(kv_spec, num_blocks, weights.device)
        self.kv.attach(self.pool)
        self.kv_manager = KVCacheManager(self.pool, config.block_size)
        self.scheduler = Scheduler(config, self.kv_manager)
        spec = AttentionSpec(hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, head_dim,
                             self.max_model_len, config.block_size, layer_windows(hf))
        self.runner = ModelRunner(self.loaded.model, self.kv, spec)
        self.calibration = CalibrationModel(config.model, self.loaded.fingerprint, self.tokenizer.encode,
                                            self._dense_pass)
        eos = self.loaded.model.generation_config.eos_token_id or hf.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.sampler = Sampler(self.eos_token_ids, config.seed)
        self.default_backend = (config.attention_backend, validate_params(config.attention_backend,
                                                                          config.attention_params))
        self.requests: dict[str, Sequence] = {}
        self.step_errors: dict[str, Exception] = {}  # requests that failed in a step, until the caller takes them
        self._ids = itertools.count()
        self._calibration_lock = threading.Lock()
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.attach(self)

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, attention_backend: str | None = None,
                    attention_params: dict[str, Any] | BaseModel | None = None) -> str:
        seq = self.new_sequence(prompt, sampling, request_id, attention_backend, attention_params)
        self.enqueue(seq)
        return seq.request_id

    def new_sequence(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                     request_id: str | None = None, attention_backend: str | None = None,
                     attention_params: dict[str, Any] | BaseModel | None = None) -> Sequence:
        """Validate a request and build its sequence, without touching the scheduler (any thread may call it)."""
        sampling = sampling or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        # The params' token ids too: the sampler indexes the logits with them.
        for name, tokens in {"prompt token ids": ids, **sampling.token_ids()}.items():
            if any(not 0 <= t < vocab for t in tokens):
                raise ValueError(f"{name} must be in [0, {vocab})")
        if sampling.allowed_token_ids is not None and sampling.min_tokens > 0:
            banned = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else self.eos_token_ids)
            if banned.issuperset(sampling.allowed_token_ids):
                raise ValueError("allowed_token_ids holds only stop tokens, which min_tokens bans: no token is left")
        max_new = sampling.max_tokens if sampling.max_tokens is not None else self.max_model_len - len(ids)
        if max_new < 1 or len(ids) + max_new > self.max_model_len:
            raise ContextLengthError(self.max_model_len, len(ids), sampling.max_tokens)
        if attention_backend is None and attention_params is None:
            backend, params = self.default_backend
        else:
            backend = attention_backend or self.config.attention_backend
            params = validate_params(backend, attention_params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        seq = Sequence(request_id, ids, sampling, backend, params, len(ids) + max_new, generator)
        impl = self.prepare_backend(backend, params)
        seq.prefix_caching = impl.capabilities.prefix_caching
        if not impl.capabilities.exact:
            # its KV differs from dense for the same tokens: a prefix-cache namespace of its own
            seq.cache_salt = hashlib.sha256(f"{backend}:{params.model_dump_json()}".encode()).digest()
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, sampling.stop_strings,
                                                 sampling.include_stop_str_in_output, sampling.skip_special_tokens)
        return seq

    def backend(self, name: str) -> AttentionBackend:
        """The engine's instance of a backend (made on first use)."""
        return self.runner.backend(name)

    def backend_ready(self, backend: str, params: BaseModel) -> bool:
        """Whether `prepare_backend` would return at once (no artifact to load or make)."""
        impl = self.runner.backends.get(backend)
        return impl is not None and (not isinstance(impl, CalibratedBackend) or impl.has_artifact(params))

    def prepare_backend(self, backend: str, params: BaseModel, calibrate: bool = True) -> AttentionBackend:
        """Build the backend (so one that cannot be built fails here), check the params against the model, and
        give it its calibration artifact: loaded, or (`calibrate`) made now when the cache has none yet."""
        impl = self.runner.backend(backend)
        try:
            impl.check(params)
            if isinstance(impl, CalibratedBackend) and not impl.has_artifact(params):
                with self._calibration_lock:  # request threads may arrive together; calibrate once
                    if not impl.has_artifact(params):
                        tensors = obtain(self.calibration, impl, params, calibrate)
                        if tensors is not None:
                            impl.load_calibration(params, tensors)
        except ValueError as e:
            raise BackendError(f"attention_params for {backend!r}: {e}") from e
        return impl

    def _dense_pass(self, ids: list[int]) -> None:
        """One dense prefill of `ids` over a scratch cache of its own (what calibration observes)."""
        bs = self.kv.spec.block_size
        blocks = cdiv(len(ids), bs)
        runner = ModelRunner(self.loaded.model, PagedKVCache(self.kv.spec, blocks + 1, self.kv.device),
                             self.runner.spec)
        seq = Sequence("calibration", ids, SamplingParams(max_tokens=1), "dense", NoParams(), len(ids) + 1)
        runner.run([(seq, len(ids))], {"calibration": list(range(1, blocks + 1))})

    def enqueue(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        seq.status = SequenceStatus.FINISHED_ABORTED
        self.scheduler.remove(seq)
        for hook in self.hooks:
            hook.on_abort()
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def usage(self) -> PoolUsage:
        return self.pool.usage()

    def free(self, request_id: str) -> None:
        """Give back every block a request holds (a worker rank, told that rank 0's request is gone)."""
        self.kv_manager.free(request_id)

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        block_tables = {seq.request_id: self.kv_manager.block_table(seq.request_id) for seq, _ in sched.scheduled}
        scheduled = sched.scheduled
        try:
            for hook in self.hooks:
                veto = hook.before_step(scheduled)
                for seq in veto.later:
                    self.scheduler.preempt(seq)
                for seq, exc in veto.failed:
                    self._fail(seq, exc)
                if veto.later or veto.failed:
                    scheduled = [(s, n) for s, n in scheduled if s not in veto.later and s.request_id in self.requests]
            results = [self.runner.run(scheduled, block_tables)]
        except Exception as exc:
            for hook in self.hooks:
                hook.on_failure(exc)
            scheduled, results = self._isolate_failures(scheduled, block_tables)
        sampling = [seq for seq, n in scheduled if seq.num_computed_tokens + n == seq.num_tokens]
        logits = results[0].logits if len(results) == 1 else torch.cat([r.logits for r in results]) if results else None
        tokens, logprobs = self.sampler(logits, sampling) if sampling else ([], [])
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            if seq.prefix_caching:
                self.kv_manager.cache_full_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens,
                                                  seq.cache_salt)
        outputs = [self._append(seq, tok, lp) for seq, tok, lp in zip(sampling, tokens, logprobs)]
        self.release_blocks(results)
        for hook in self.hooks:
            hook.after_step()
        return outputs

    def release_blocks(self, results: list[StepResult]) -> None:
        """After a step: give back the blocks each backend says its sequences will never read again."""
        for seq, step in (step for r in results for step in r.steps):
            if not seq.is_finished:
                release = self.runner.backends[seq.backend].blocks_to_release(step)
                if release:
                    self.kv_manager.release(seq.request_id, release)

    def run_planned(self, chunks: list[tuple[Sequence, int, Iterable[int]]]) -> None:
        """Run a step another rank scheduled: each sequence's `n` tokens from its num_computed_tokens, with only the
        given block-table entries backed by blocks of this rank's pool (a rank that holds part of a sequence's KV).
        Raises MemoryError when the pool cannot back them."""
        for seq, n, entries in chunks:
            if not self.kv_manager.allocate_at(seq.request_id, seq.num_computed_tokens + n, entries):
                raise MemoryError(f"no KV blocks left for request {seq.request_id}")
        tables = {seq.request_id: self.kv_manager.block_table(seq.request_id) for seq, _, _ in chunks}
        self.release_blocks([self.runner.run([(seq, n) for seq, n, _ in chunks], tables)])

    def _isolate_failures(self, scheduled: list[tuple[Sequence, int]], block_tables: dict[str, list[int]]
                          ) -> tuple[list[tuple[Sequence, int]], list[StepResult]]:
        """A step failed: rerun its sequences one by one, so the one that fails fails alone. The failed ones
        are finished with status error and listed in `step_errors`; nothing of the step was committed (backends
        commit state after a step, never in `prepare`), so the others simply go on."""
        kept, results = [], []
        for seq, n in scheduled:
            try:
                results.append(self.runner.run([(seq, n)], block_tables))
                kept.append((seq, n))
            except Exception as exc:
                logger.exception("request %s failed inside the engine", seq.request_id)
                self._fail(seq, exc)
        return kept, results

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """Finish a request with status error; the caller takes `exc` from `step_errors`."""
        self.step_errors[seq.request_id] = exc
        seq.status = SequenceStatus.FINISHED_ERROR
        self.requests.pop(seq.request_id, None)
        self.scheduler.remove(seq)

    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        sp = seq.sampling
        seq.token_ids.append(token)
        stopped_by_text = seq.detokenizer.add_token(token)
        can_stop = seq.num_output_tokens >= sp.min_tokens
        if can_stop and not sp.ignore_eos and token in self.eos_token_ids:
            seq.status = SequenceStatus.FINISHED_STOPPED
        elif can_stop and token in sp.stop_token_ids:
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        elif stopped_by_text:
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, seq.detokenizer.stop_reason
        elif seq.num_tokens >= seq.max_total_tokens:
            seq.status = SequenceStatus.FINISHED_LENGTH
        if seq.is_finished:
            self.requests.pop(seq.request_id, None)
            self.scheduler.remove(seq)
        return RequestOutput(
            seq.request_id, seq.prompt_token_ids, [token], seq.detokenizer.take_new_text(seq.is_finished),
            seq.output_token_ids, seq.detokenizer.output_text, seq.is_finished,
            seq.status.value if seq.is_finished else None, seq.stop_reason, seq.num_cached_tokens,
            [logprobs] if logprobs else [],
        )

    def generate(self, prompts: list[str | list[int]], sampling: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False, **backend: Any) -> list[RequestOutput]:
        """Run prompts to completion; results in prompt order."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        ids = [self.add_request(p, sp, **backend) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not progress) as bar:
            while self.has_unfinished_requests():
                for out in self.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update()
                failed = next((i for i in ids if i in self.step_errors), None)
                if failed is not None:
                    for i in ids:
                        self.abort(i)
                    exc = self.step_errors.pop(failed)
                    raise EngineStepError(f"request {failed} failed inside the engine: {exc}", exc) from exc
        return [final[i] for i in ids]

"""All settings in one typed place. Every field reads from the environment with the `TTS_` prefix
(e.g. `TTS_POLICY_URL`), and the CLI flags override them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tts_server.affinity import AffinityKey, AffinityScope
from tts_server.confidence import ConfidenceMetric
from tts_server.types import Aggregation, ConfidenceConfig, SelectionRule, StrategyName

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# The PRM worker's backends (prm_worker/backends registers one of each).
PRMBackendName = Literal["arith", "hf", "vllm", "judge"]
CACHE_DIR = Path.home() / ".cache" / "tts-server"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TTS_", extra="ignore")

    # --- gateway ---
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    # uvicorn worker processes; with more than one, /metrics aggregates them (multiprocess mode)
    # and SIGTERM is uvicorn's graceful shutdown, without the 503 draining phase.
    workers: int = 1

    # --- protection (see README "Reliability and security") ---
    # SHA-256 hex digests of accepted API keys, comma-separated (`tts-server hash-key KEY`);
    # empty: no authentication.
    api_key_hashes: str = ""
    # A TOML file of keys with their own quotas ([[keys]] hash = "..." plus any of
    # requests_per_minute, tokens_per_minute, flops_per_minute, flops_per_day); its keys are
    # accepted besides api_key_hashes.
    api_keys_file: Path | None = None
    # Quotas for every key (a keys file entry overrides each it names); unset: no limit. Without
    # API keys they hold for all clients together. Counted per worker process unless redis_url.
    quota_requests_per_minute: int | None = Field(default=None, ge=0)
    quota_tokens_per_minute: int | None = Field(default=None, ge=0)
    quota_flops_per_minute: float | None = Field(default=None, ge=0)  # 1e15 reads as it says
    quota_flops_per_day: float | None = Field(default=None, ge=0)
    # Quota counters shared by all workers and replicas (redis://host:port/db).
    redis_url: str | None = None
    redis_timeout_s: float = Field(default=0.25, gt=0)
    # Redis down: admit uncounted (true) or refuse with 503 (false).
    quota_fail_open: bool = True
    # /metrics needs a key too (when keys are set).
    metrics_require_key: bool = False
    max_body_bytes: int = 1_048_576
    max_prompt_tokens: int = 1536
    max_messages: int = 64
    max_stop_strings: int = 4
    max_stop_length: int = 128
    # Slow clients (tts_server/api/connections.py): a request's head must arrive within
    # head_timeout_s, its body within body_timeout_s of the head (else 408, connection closed);
    # an idle kept-alive connection is closed after keep_alive_timeout_s; past max_connections
    # open connections per worker process (0: no cap) a new one gets a 503 and is closed.
    head_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=2048, ge=0)
    max_in_flight: int = 16
    max_queue: int = 64
    queue_timeout_s: float = 30.0
    # Whole-request deadline: past it, the best finished answer so far (marked partial) or 504.
    request_timeout_s: float = 600.0
    # `stream: true`: seconds between progress chunks (or keep-alive comments) while a search runs.
    stream_progress_interval_s: float = Field(default=1.0, gt=0)
    # Readiness probes of vLLM and the PRM worker.
    probe_interval_s: float = 2.0
    # With the PRM worker down, answer PRM strategies by majority vote (stated in `tts`)
    # instead of failing fast with 503.
    degrade_to_majority: bool = False
    # On SIGTERM: refuse new requests with 503, let in-flight ones finish up to this long.
    drain_timeout_s: float = 30.0
    upstream_retries: int = 2
    retry_backoff_s: float = 0.2
    retry_backoff_cap_s: float = 2.0
    # Prompts and completions in logs (debug level); off unless asked.
    log_prompts: bool = False

    # --- trace export (README "Search traces for distillation"; tts_server/traces.py) ---
    # A folder for JSON-lines trace files, one record per answered request; unset: no traces.
    trace_dir: Path | None = None
    # "opt_in": only requests that ask (`tts.trace_export: true` or X-TTS-Trace-Export: true);
    # "all": every answered request; "off": none, and a request that asks is refused (400).
    trace_mode: Literal["off", "opt_in", "all"] = "opt_in"
    # The client's messages or prompt, and the question, in each record (export needs them);
    # off: records hold no prompt text.
    trace_prompts: bool = False
    # A file is closed and a new one started once it is this large.
    trace_max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Records waiting for the writer thread; past it, records are dropped (counted), never
    # waited on.
    trace_queue_size: int = Field(default=1000, ge=1)

    # --- the search trace in responses and the inspector (docs/trace.md) ---
    # At most this many tree nodes in a trace (`tts.trace`, export records, the inspector);
    # past it the selected path and the candidates' paths are kept first and `truncated` says
    # how many nodes were left out.
    trace_max_nodes: int = Field(default=1000, ge=1)
    # Each text (a node's step, a candidate's text and steps) in a response's trace is cut to
    # this many characters (`truncated.texts_cut` counts them); export records keep whole texts.
    trace_max_text_chars: int = Field(default=2000, ge=16)
    # The inspector page (/inspector/) and its store of recent traces; off by default.
    inspector: bool = False
    # The store keeps the traces of the last this many answered requests...
    inspector_max_traces: int = Field(default=100, ge=1)
    # ...each for at most this long...
    inspector_max_age_s: float = Field(default=3600.0, gt=0)
    # ...and all of them at most this many bytes of JSON (the oldest go first).
    inspector_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    # --- upstreams ---
    policy_url: str = "http://127.0.0.1:8100"
    # The model name served by vLLM; also what /v1/models lists and clients must name.
    policy_model: str = DEFAULT_MODEL
    policy_timeout_s: float = 300.0
    prm_url: str = "http://127.0.0.1:8200"
    prm_timeout_s: float = 120.0
    # "per_prompt": a step's prompts go as concurrent requests (vLLM batches them) and each
    # reports its prefix-cache hits, so FLOPs are exact; "batched": one request per step, cached
    # tokens then known for its last prompt only (vLLM 0.32).
    policy_call_mode: Literal["per_prompt", "batched"] = "per_prompt"

    # --- replica affinity (README "Scale-out"; tts_server/affinity.py) ---
    # The header that carries a request's affinity key on every policy and PRM call, read by a
    # router in front of several replicas (vllm-router pins on x-session-id); empty: none sent.
    affinity_header: str = Field(default="x-session-id", pattern=r"^([A-Za-z0-9-]+)?$")
    # "request": all of a request's calls on one replica (most prefix-cache hits); "subtree":
    # each DVTS subtree on its own replica (spreads one request's load; others stay per request).
    affinity_scope: AffinityScope = "request"
    # "random": a request's own id; "prompt": a keyed digest of its prompt, so requests that ask
    # the same question share a pin (and a replica's prefix cache), released after the last.
    affinity_key: AffinityKey = "random"
    # The digest's secret for "prompt"; empty: a random one per process (set one shared secret
    # when several gateway replicas should send the same question to the same replica).
    affinity_secret: str = Field(default="", repr=False)
    # Released when a request ends, `POST URL?session_id=KEY` (vllm-router's /finish_session);
    # unset: no release (the router expires sessions itself).
    affinity_release_url: str | None = None
    affinity_release_timeout_s: float = Field(default=2.0, gt=0)

    # --- FLOPs count (tts_server/flops.py) ---
    # Parameter counts; unset: read from the policy's config.json (policy_config_path, else the
    # folder vLLM reports as the model's root) and from the PRM worker's /v1/models.
    policy_params: int | None = None
    policy_config_path: Path | None = None
    prm_params: int | None = None
    # Keep each step's PRM score for the request's search, so that a step is scored once and
    # not again at every later iteration (off: every call scores every step, as the references).
    prm_step_cache: bool = True
    # Add attention's context term (4 x layers x d_attn x position per token).
    flops_include_attention: bool = False

    # --- local policy server (`tts-server policy`) ---
    policy_port: int = 8100
    cache_dir: Path = CACHE_DIR
    vllm_python: Path = CACHE_DIR / "vllm-venv" / "bin" / "python"
    # A Hugging Face folder; empty means the embedded SmolLM2 prepared under cache_dir/models.
    policy_model_path: Path | None = None
    max_model_len: int = 2048
    # "auto": bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32,
    # which is about 4x faster than emulated bfloat16 on AVX2-only CPUs.
    policy_dtype: str = "auto"
    kv_cache_gib: int = 2
    # KV-cache block size. vLLM's CPU default is 128 tokens, and the prefix cache reuses only
    # whole blocks: a search step re-sends its prefix, so up to 127 tokens per call were
    # recomputed. 32 is the smallest size vLLM CPU accepts (its attention kernel takes multiples
    # of 32: 16 fails at start with "No common block size").
    policy_block_size: int = Field(default=32, ge=32, multiple_of=32)
    # `tts-server up`: vLLM replicas of the policy on consecutive free ports from policy_port,
    # each with kv_cache_gib, behind vllm-router on policy_port (1: one vLLM, no router).
    policy_replicas: int = Field(default=1, ge=1, le=16)
    router_bin: Path = CACHE_DIR / "router-venv" / "bin" / "vllm-router"
    # sticky_least_loaded pins on the affinity header; the others are for comparison runs.
    router_policy: Literal["sticky_least_loaded", "consistent_hash", "round_robin", "random"] = (
        "sticky_least_loaded"
    )
    router_prometheus_port: int = 8190

    # --- PRM worker (`tts-server prm-worker`) ---
    prm_port: int = 8200
    prm_backend: PRMBackendName = "arith"
    # hf: the model folder; vllm: the PRM's served model name.
    prm_model_path: str | None = None
    # vllm: the vLLM server that serves the PRM as a pooling model.
    prm_vllm_url: str | None = None
    # "arith": a step with a wrong equation scores 0 whatever a learned PRM says.
    prm_veto: Literal["arith"] | None = None

    # --- the PRM's own vLLM (`tts-server up` with prm_backend vllm and no prm_vllm_url) ---
    # What `up` serves: a local model folder or a hub id (hf: the folder the worker loads).
    # Unset: prm_model_path, the worker's older name for the same folder.
    prm_model: str | None = None
    # The name vLLM serves it under; unset: the folder's or the hub id's last part.
    prm_served_name: str | None = None
    prm_vllm_port: int = 8300
    # The `<extra_0>` step tag's id; unset: read from a local folder's tokenizer, else vLLM's
    # Qwen default (151651).
    prm_step_tag_id: int | None = None
    prm_max_model_len: int | None = None
    prm_dtype: str = "auto"
    # Beside the policy's kv_cache_gib on the same CPU.
    prm_kv_cache_gib: int = 1
    # hf, vllm: a PRM of prm_worker/registry.toml, by name or model id (`prm-worker --list`).
    prm_name: str | None = None
    # judge: an OpenAI-compatible endpoint whose model answers "is this step correct?"; unset:
    # the policy (policy_url, and policy_model unless prm_model_path names another).
    prm_judge_url: str | None = None
    prm_judge_mode: Literal["step", "solution"] | None = None
    prm_judge_top_logprobs: int | None = None

    # --- strategy defaults and caps ---
    default_strategy: StrategyName = "auto"

    # --- router (`auto`) ---
    # A table written by `tts-server calibrate`; unset: the table measured for this policy and
    # PRM if the project ships one (tts_server/router_tables/), else the generic one by size.
    router_table: Path | None = None
    # Off: ignore the shipped measured tables and serve the generic table by policy size.
    router_measured: bool = True
    # A weak PRM makes search pointless: route everything to best-of-N (Liu et al.).
    router_weak_prm: bool = False
    default_budget: int = 8
    max_budget: int = 64
    default_beam_width: int = 4
    default_aggregation: Aggregation = "last"
    default_selection: SelectionRule = "weighted"
    default_temperature: float = 0.8
    max_step_tokens: int = 256
    default_max_tokens: int = 512
    max_tokens_cap: int = 2048
    max_iterations: int = 40

    # --- trace confidence (DeepConf; tts_server/confidence.py, docs/confidence.md) ---
    # Top logprobs per token sampled for confidences (vLLM serves at most 20 by default).
    confidence_top_k: int = Field(default=5, ge=1, le=20)
    # Group window and tail, in tokens: short, for solutions of tens to hundreds of tokens.
    confidence_window: int = Field(default=16, ge=1)
    confidence_tail: int = Field(default=32, ge=1)
    # What the `confidence` and `filtered` votes weigh; the share `filtered` keeps.
    confidence_metric: ConfidenceMetric = "bottom_10"
    confidence_keep: float = Field(default=0.9, gt=0.0, le=1.0)
    # Sample every request with logprobs, so `tts.candidate_confidences` is always there
    # (otherwise only when the request needs them: a confidence vote, deepconf, logprobs).
    confidence_always: bool = False
    # `adaptive` named by a client: rounds of this many samples until the Beta posterior that
    # the leading answer beats the second reaches the threshold (Aggarwal et al.).
    adaptive_round_size: int = Field(default=2, ge=1)
    adaptive_threshold: float = Field(default=0.95, gt=0.5, lt=1.0)
    # Also stop once the leader is this many samples ahead, or once this many samples hold no
    # two equal answers (a question the policy cannot settle; None: off). Off by default.
    adaptive_stop_margin: int | None = Field(default=None, ge=1)
    adaptive_give_up_after: int | None = Field(default=None, ge=2)
    # `deepconf` (online): warm-up traces, the share kept (the threshold is the
    # 100 * (1 - keep)-th percentile of the warm-up's lowest-group confidences), traces streamed
    # per round, and the vote share that ends sampling.
    deepconf_warmup: int = Field(default=4, ge=1)
    deepconf_keep: float = Field(default=0.9, gt=0.0, le=1.0)
    deepconf_round_size: int = Field(default=2, ge=1)
    deepconf_consensus: float = Field(default=0.95, gt=0.5, le=1.0)

    # --- prompting ---
    # Profile per served model name: a packaged profile name or a path to a JSON profile.
    prompt_profiles: dict[str, str] = Field(
        default_factory=lambda: {DEFAULT_MODEL: "smollm2-fewshot"}
    )
    default_prompt_profile: str = "chat-default"

    @property
    def embedded_model_dir(self) -> Path:
        return self.cache_dir / "models" / DEFAULT_MODEL

    @property
    def key_hashes(self) -> list[str]:
        return [h.strip() for h in self.api_key_hashes.split(",") if h.strip()]

    @property
    def quota_defaults(self) -> dict[str, int]:
        values = {
            "requests": self.quota_requests_per_minute,
            "tokens": self.quota_tokens_per_minute,
            "flops_minute": self.quota_flops_per_minute,
            "flops_day": self.quota_flops_per_day,
        }
        return {kind: int(value) for kind, value in values.items() if value is not None}

    def profile_for(self, model: str) -> str:
        return self.prompt_profiles.get(model, self.default_prompt_profile)

    def confidence(self, sample: int | None = None) -> ConfidenceConfig:
        """DeepConf's measures and the confidence votes as these settings set them; `sample`:
        top logprobs to sample with (None: none)."""
        return ConfidenceConfig(
            sample=sample,
            k=self.confidence_top_k,
            window=self.confidence_window,
            tail=self.confidence_tail,
            metric=self.confidence_metric,
            keep=self.confidence_keep,
        )

"""`tts-server bench` (`make bench`): the gateway under load, side by side with direct vLLM and a
peer (optillm), on loopback, bounded in count and time. See docs/performance.md.

Modules: `cli` (flags, the run), `stack` (start or reuse vLLM, PRM worker, gateway), `load`
(closed-loop client, latency and answers), `engine_metrics` (vLLM's /metrics counters),
`cells` (results saved per cell, so a run resumes), `scenarios` (overhead, saturation, prefix
cache, PRM path), `gateway_cost` (CPU per answer against zero-latency fakes), `peer` (optillm in
its own venv), `summary` (ratios and targets), `report` (JSON, PNG plots, docs/performance.md),
`machine` (what it ran on).
"""

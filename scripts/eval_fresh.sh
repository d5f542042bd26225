#!/usr/bin/env bash
# One `tts-server eval` on a freshly started stack, so vLLM's prefix cache holds nothing from
# earlier runs (a strategy measured after another on the same problems is otherwise charged
# less). Resumable: a run whose report exists is skipped.
#   scripts/eval_fresh.sh OUT.json [eval arguments...]
# The stack's environment (TTS_* settings) passes through; ports are the defaults.
set -euo pipefail
out=$1; shift
if [[ -s $out ]]; then echo "skip $out (exists)"; exit 0; fi
bin=${BIN:-.venv/bin}
gateway=${TTS_EVAL_URL:-http://127.0.0.1:8000}
log=${out%.json}.stack.log
setsid "$bin/tts-server" up >"$log" 2>&1 &
stack=$!
stop() { kill -TERM "$stack" 2>/dev/null || true; wait "$stack" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 600); do
  if curl -fsS "$gateway/health/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$stack" 2>/dev/null; then echo "stack exited; see $log" >&2; exit 1; fi
  sleep 1
done
curl -fsS "$gateway/health/ready" >/dev/null
"$bin/tts-server" eval --url "$gateway" --out "$out.part" "$@"
mv "$out.part" "$out"

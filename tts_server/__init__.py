"""tts-server: test-time-scaling inference over vLLM with a process reward model."""

__version__ = "0.1.0"

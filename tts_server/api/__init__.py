"""The OpenAI-compatible gateway: `tts_server.api.app.create_app`."""

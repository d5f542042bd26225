"""Starting processes: the local vLLM server, the embedded model it serves, and the whole
stack (`tts-server up`)."""

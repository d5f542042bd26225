"""The gateway's clients of its upstreams: vLLM (the policy) and the PRM worker."""

from tts_server.clients.policy import PolicyError, VLLMPolicyClient
from tts_server.clients.prm import HTTPPRMClient, PRMError

__all__ = ["HTTPPRMClient", "PRMError", "PolicyError", "VLLMPolicyClient"]

"""The gateway's clients of its upstreams: vLLM (the policy) and the PRM worker. Both raise an
`UpstreamError` subclass and retry per one `RetryPolicy` (the plumbing: clients/http.py)."""

from tts_server.clients.http import RetryPolicy, UpstreamError
from tts_server.clients.policy import PolicyError, VLLMPolicyClient
from tts_server.clients.prm import HTTPPRMClient, PRMError
from tts_server.clients.sessions import SessionRelease

__all__ = [
    "HTTPPRMClient",
    "PRMError",
    "PolicyError",
    "RetryPolicy",
    "SessionRelease",
    "UpstreamError",
    "VLLMPolicyClient",
]

"""The PRM worker: a small FastAPI service that scores solution steps with a PRM backend.

Run it with `python -m tts_server.prm_worker --backend arith --port 8200`.
"""

from tts_server.prm_worker.app import create_app
from tts_server.prm_worker.backends import BACKENDS, PRMBackend, ScoreItem, load_backend
from tts_server.prm_worker.schemas import ScoreLimits

__all__ = ["BACKENDS", "PRMBackend", "ScoreItem", "ScoreLimits", "create_app", "load_backend"]

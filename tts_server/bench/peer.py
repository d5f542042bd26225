"""The peer: optillm (an optimizing inference proxy), installed by the benchmark in a venv of its
own (never vendored, never a project dependency) and pointed at the same vLLM.

    python -m tts_server.bench.peer --install     # what `make install-optillm` runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tts_server.bench.stack import StackError, free_port
from tts_server.settings import Settings

OPTILLM = "optillm==0.4.0"
# optillm depends on torch: the CPU build from the local wheel, so pip pulls no CUDA build.
TORCH = "torch==2.13.0"


class PeerUnavailable(RuntimeError):
    """optillm could not be installed or started; the message says exactly why."""


def default_venv() -> Path:
    return Settings().cache_dir / "optillm-venv"


def installed(venv: Path) -> bool:
    try:
        return (venv / ".installed").read_text().strip() == OPTILLM
    except OSError:
        return False


def install(venv: Path, log: Path | None = None) -> None:
    """Create the venv and install the pinned optillm (a few minutes once); PeerUnavailable
    with pip's last lines when it fails."""
    if installed(venv):
        return
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", TORCH],
        [str(venv / "bin" / "pip"), "install", "-q", OPTILLM],
    ]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if log is not None:
            with log.open("a") as out:
                out.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n")
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if not ln.startswith("WARNING: Loc")]
            tail = "\n".join(lines[-8:])
            raise PeerUnavailable(f"`{' '.join(argv)}` exited {done.returncode}:\n{tail}")
    (venv / ".installed").write_text(OPTILLM + "\n")


@contextlib.contextmanager
def optillm_server(
    venv: Path, policy_url: str, logs: Path, *, best_of_n: int, timeout_s: float = 180
) -> Iterator[str]:
    """optillm's proxy on 127.0.0.1 in front of `policy_url`'s OpenAI API; its URL."""
    binary = venv / "bin" / "optillm"
    if not binary.exists():
        raise PeerUnavailable(f"no optillm in {venv}: install it first (make install-optillm)")
    port = free_port()
    argv = [
        str(binary),
        "--base-url",
        f"{policy_url}/v1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--best-of-n",
        str(best_of_n),
        "--log",
        "warning",
    ]
    # optillm builds an OpenAI client from this variable; the local vLLM checks no key.
    env = {**os.environ, "OPENAI_API_KEY": "sk-local-vllm-needs-no-key"}
    log_path = logs / "optillm.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-8:])
                raise PeerUnavailable(f"optillm exited with code {process.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise StackError(f"optillm not healthy after {timeout_s} s")
            time.sleep(1)
        yield url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description="install optillm for `tts-server bench`")
    parser.add_argument("--install", action="store_true")
    parser.add_argument("--venv", type=Path, default=None)
    args = parser.parse_args()
    venv = args.venv or default_venv()
    if args.install:
        try:
            install(venv)
        except PeerUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{OPTILLM} in {venv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The offline tools' commands on `tts-server`: registered cheaply, so that starting the gateway
loads neither matplotlib nor tqdm; one clear line when the tools extra is missing; and a gateway
without tts_server/tools at all (the image) still starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tts_server.cli import build_parser


def _python(code: str, *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_starting_the_gateway_imports_no_tool_and_neither_matplotlib_nor_tqdm() -> None:
    code = (
        "import sys\n"
        "from tts_server.cli import build_parser\n"
        "args = build_parser().parse_args(['gateway', '--port', '8123'])\n"
        "assert args.command == 'gateway'\n"
        "build_parser().parse_args(['up'])\n"
        "from tts_server.api.app import create_app\n"
        "heavy = [m for m in ('matplotlib', 'tqdm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "tools = sorted(m for m in sys.modules if m.startswith('tts_server.tools'))\n"
        "assert tools == ['tts_server.tools', 'tts_server.tools.cli'], tools\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr


def test_the_tool_commands_keep_their_flags(tmp_path: Path) -> None:
    parser = build_parser()
    plot = parser.parse_args(["plot", "a.json", "b.json", "--table", "--versus", "--by-difficulty"])
    assert plot.reports == [Path("a.json"), Path("b.json")] and plot.by_difficulty
    assert plot.out == Path("reports/accuracy-vs-flops.png")
    ev = parser.parse_args(["eval", "--dataset", "gsm8k", "--temperature", "0.7", "--limit", "5"])
    assert (ev.dataset, ev.temperature, ev.limit, ev.budget) == ("gsm8k", 0.7, 5, 8)
    cal = parser.parse_args(["calibrate", "--dataset", "d", "--refit", "--rule", "max"])
    assert cal.refit and cal.rule == "max" and cal.pilot == 4 and cal.compare is None
    assert parser.parse_args(["report", "--since", "15m"]).prometheus == "http://127.0.0.1:9090"
    out = tmp_path / "dashboards"
    assert parser.parse_args(["dashboards", "--out", str(out)]).out == out


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["plot", "missing.json"], "matplotlib"),
        (["report", "--since", "1h"], "matplotlib"),
        (["eval", "--dataset", "mawps_singleop"], "tqdm"),
        (["calibrate", "--dataset", "mawps_singleop"], "tqdm"),
    ],
)
def test_a_tool_without_the_extra_says_so_in_one_line(argv: list[str], module: str) -> None:
    # None in sys.modules makes `import module` fail as if it were not installed.
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from tts_server.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    result = _python(code)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: 'tts-server {argv[0]}' needs the tools extra ({module} not installed): "
        "pip install 'tts-server[tools]'\n"
    )
    assert result.stdout == ""


def test_dashboards_need_no_extra(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = sys.modules['tqdm'] = None\n"
        "from tts_server.cli import main\n"
        f"sys.exit(main(['dashboards', '--out', {str(tmp_path)!r}]))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    written = sorted(tmp_path.glob("*.json"))
    assert written and all(json.loads(p.read_text())["panels"] for p in written)


def test_without_the_tools_package_the_gateway_commands_remain() -> None:
    """The gateway image deletes tts_server/tools: the parser is built without the tools."""
    code = (
        "import sys\n"
        "sys.modules['tts_server.tools'] = None\n"
        "from tts_server.cli import build_parser\n"
        "parser = build_parser()\n"
        "assert parser.parse_args(['gateway']).command == 'gateway'\n"
        "parser.parse_args(['plot', 'a.json'])\n"
    )
    result = _python(code)
    assert result.returncode == 2  # argparse: no such command
    assert "invalid choice: 'plot'" in result.stderr and "Traceback" not in result.stderr

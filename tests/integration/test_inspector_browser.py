"""The inspector page in a real browser (Debian's chromium and chromium-driver, `make chromium`,
driven by selenium) against the real stack: the session's vLLM and PRM worker, and a gateway
of this module's with the inspector on and an API key. A beam search at budget 8 grows live,
ends with 8 candidate leaves and the chosen answer highlighted; the finished request opens by
its id; bad input shows the API's error. Screenshots go to reports/inspector/ (look at them)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.support.servers import ServerProcess, cli, free_port
from tts_server.api.reliability import hash_key

pytestmark = pytest.mark.integration

KEY = "sk-inspector-browser-0123456789"
QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
SHOTS = Path(__file__).parents[2] / "reports" / "inspector"
SEARCH_S = 300  # a beam search at budget 8 on the 2-core CPU: seconds, not minutes


@pytest.fixture(scope="module")
def inspector_url(policy_url: str, prm_url: str, log_dir: Path) -> Iterator[str]:
    port = free_port()
    argv = cli("gateway", "--port", str(port), "--policy-url", policy_url, "--prm-url", prm_url)
    # Progress every 0.1 s: at the default 1 s a beam search on an idle machine (about 2 s) can
    # end before a progress chunk carries its first step's nodes, and the live view stays empty.
    env = {
        "TTS_INSPECTOR": "true",
        "TTS_API_KEY_HASHES": hash_key(KEY),
        "TTS_STREAM_PROGRESS_INTERVAL_S": "0.1",
    }
    server = ServerProcess("gateway-inspector", argv, port, log_dir).start(env)
    try:
        server.wait_healthy(60)
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("chromium and chromium-driver are not installed: run `make chromium`")
    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1500,1300")
    options.binary_location = chromium
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def _load(browser: WebDriver, url: str) -> None:
    browser.get(url + "/inspector/")
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "status").text == "ready")
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(KEY)


def _finished(browser: WebDriver, timeout_s: float) -> str:
    """The status once the page is done or failed."""
    WebDriverWait(browser, timeout_s, poll_frequency=0.2).until(
        lambda b: b.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error")
    )
    return browser.find_element(By.ID, "status").get_attribute("data-state") or ""


def _set(browser: WebDriver, field: str, value: str) -> None:
    box = browser.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)


def _shot(browser: WebDriver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    # The whole page: the tree and the tables under it.
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1500, max(1300, int(height) + 40))
    path = SHOTS / name
    browser.save_screenshot(str(path))
    return path


def _drawn(browser: WebDriver) -> tuple[list[str], str, str]:
    """The candidate leaves' answers, the chosen leaf's answer, the page's stated answer."""
    leaves = browser.find_elements(By.CSS_SELECTOR, "#tree .node.candidate")
    [chosen] = browser.find_elements(By.CSS_SELECTOR, "#tree .node.chosen")
    assert "candidate" in (chosen.get_attribute("class") or "")
    stated = browser.find_element(By.ID, "answer").text.removeprefix("answer: ")
    return (
        [leaf.get_attribute("data-answer") or "" for leaf in leaves],
        (chosen.get_attribute("data-answer") or ""),
        stated,
    )


def test_a_beam_search_grows_live_and_ends_with_8_leaves_and_the_answer_highlighted(
    browser: WebDriver, inspector_url: str
) -> None:
    _load(browser, inspector_url)
    Select(browser.find_element(By.ID, "strategy")).select_by_visible_text("beam_search")
    _set(browser, "budget", "8")
    _set(browser, "beam-width", "4")
    _set(browser, "prompt", QUESTION)
    browser.find_element(By.ID, "run").click()
    state = _finished(browser, SEARCH_S)
    assert state == "done", browser.find_element(By.ID, "error").text
    shot = _shot(browser, "beam-search-budget-8.png")
    request_id = browser.find_element(By.ID, "open-id").get_attribute("value") or ""
    assert request_id.startswith("chatcmpl-")

    answers, chosen, stated = _drawn(browser)
    assert len(answers) == 8, f"{len(answers)} candidate leaves (screenshot: {shot})"
    assert chosen == stated != "(none)"
    # The tree grew on the page while the search ran (nodes from the progress chunks).
    assert int(browser.find_element(By.ID, "tree").get_attribute("data-live-nodes") or 0) > 0
    # The vote's group of the chosen answer is the highlighted row.
    [row] = browser.find_elements(By.CSS_SELECTOR, "#groups tr.selected")
    assert row.find_elements(By.TAG_NAME, "td")[0].text == stated
    # What the page drew is what the server stored for that id.
    stored = httpx.get(
        f"{inspector_url}/inspector/api/traces/{request_id}",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    ).json()["trace"]
    assert stored["strategy"] == "beam_search" and len(stored["candidates"]) == 8
    assert stored["answer"] == stated
    assert sorted(answers) == sorted(c["answer"] or "" for c in stored["candidates"])

    # Open it again by its id, from a fresh page.
    _load(browser, inspector_url)
    _set(browser, "open-id", request_id)
    browser.find_element(By.ID, "open").click()
    assert _finished(browser, 30) == "done", browser.find_element(By.ID, "error").text
    _shot(browser, "opened-by-id.png")
    again, chosen_again, stated_again = _drawn(browser)
    assert sorted(again) == sorted(answers)
    assert (chosen_again, stated_again) == (chosen, stated)
    assert request_id in browser.find_element(By.ID, "request-line").text


def test_bad_input_and_a_missing_key_show_the_apis_errors(
    browser: WebDriver, inspector_url: str
) -> None:
    _load(browser, inspector_url)
    Select(browser.find_element(By.ID, "strategy")).select_by_visible_text("beam_search")
    _set(browser, "budget", "6")  # not a multiple of the beam width
    _set(browser, "beam-width", "4")
    browser.find_element(By.ID, "run").click()
    assert _finished(browser, 30) == "error"
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("400") and "param: " in error, error

    _load(browser, inspector_url)
    _set(browser, "key", "sk-wrong")
    _set(browser, "open-id", "chatcmpl-0")
    browser.find_element(By.ID, "open").click()
    assert _finished(browser, 30) == "error"
    assert browser.find_element(By.ID, "error").text.startswith("401")

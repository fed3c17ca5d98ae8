"""The web page with API keys on (issue 10 §5): a 401 asks for the key, the key works, and
it stays out of localStorage (unless "remember") and out of exported files; a 429 shows
its retry time.

One application for the module: the demo qwen2 group behind an API key file and a rate
limit, under its own route prefix. The rate-limit test uses a second key (each key has its
own bucket), so the other tests never meet the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.frontend.conftest import deploy

pytest.importorskip("playwright", reason="pip install -e '.[test]' installs playwright")
from playwright.sync_api import Page, expect  # noqa: E402

APP = "frontend-page-auth"
PREFIX = "/page-auth"
API_KEY = "page-test-key-0123456789"
RATE_KEY = "page-rate-key-9876543210"  # drained by the 429 test
RATE_PER_MINUTE = 30
QWEN = "qwen2-tiny-l1"
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def served(
    ray_cluster: Any,
    write_groups: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SimpleNamespace]:
    from ray import serve

    keys = tmp_path_factory.mktemp("page-keys") / "api_keys"
    keys.write_text(f"# the page's test keys\n{API_KEY}\n{RATE_KEY}\n")
    groups_dir = write_groups(("qwen2-tiny",))
    deploy(
        APP,
        PREFIX,
        groups_dir,
        ray_cluster.http_url,
        api_keys_file=str(keys),
        rate_limit_per_minute=RATE_PER_MINUTE,
    )
    base = ray_cluster.http_url + PREFIX
    with httpx.Client(base_url=base, timeout=120) as client:
        assert client.get("/api/v2/groups").status_code == 401  # keys are on
        yield SimpleNamespace(url=base + "/", client=client)
    serve.delete(APP)


def enter_key(page: Page, key: str, *, remember: bool = False) -> None:
    page.get_by_test_id("api-key-input").fill(key)
    page.get_by_test_id("api-key-remember").set_checked(remember)
    page.get_by_test_id("api-key-save").click()


def storage(page: Page, kind: str) -> str:
    """Every key and value of localStorage or sessionStorage, as one string."""
    return page.evaluate(f"() => Object.entries({kind}).map(([k, v]) => k + '=' + v).join('\\n')")


def test_without_a_key_the_page_shows_401_and_asks_for_one(
    page: Page, served: SimpleNamespace, screenshots: Any
) -> None:
    page.goto(served.url)
    error = page.get_by_test_id("error")
    expect(error).to_have_attribute("data-status", "401")
    expect(error).to_have_attribute("data-code", "unauthorized")
    expect(error).to_contain_text("listing the groups")
    expect(page.get_by_test_id("key-prompt")).to_contain_text("needs an API key")
    expect(page.get_by_test_id("lens-option")).to_have_count(0)
    error.get_by_role("button", name="Enter API key").click()
    expect(page.get_by_test_id("api-key-input")).to_be_focused()
    screenshots(page, "auth-401")


def test_a_wrong_key_is_refused_visibly(page: Page, served: SimpleNamespace) -> None:
    page.goto(served.url)
    enter_key(page, "not-the-key")
    expect(page.get_by_test_id("key-prompt")).to_contain_text("refused this key")
    expect(page.get_by_test_id("error")).to_have_attribute("data-status", "401")


def test_with_the_key_the_page_works_and_the_key_stays_out_of_storage(
    page: Page, served: SimpleNamespace, tmp_path: Path, screenshots: Any
) -> None:
    page.goto(served.url)
    expect(page.get_by_test_id("error")).to_have_attribute("data-status", "401")
    enter_key(page, API_KEY)
    expect(page.get_by_test_id("lens-option")).to_have_count(4)
    expect(page.get_by_test_id("error")).to_have_count(0)
    page.locator(f'[data-testid="lens-option"][data-lens-id="{QWEN}"]').click()
    page.get_by_test_id("text-input").fill(TEXT)
    page.get_by_test_id("opt-temperature").fill("0")
    page.get_by_test_id("analyze-button").click()
    tab = page.get_by_test_id("tab")
    expect(tab).to_have_attribute("data-status", "done")
    expect(page.get_by_test_id("result-row").first).to_be_visible()
    # Session storage only, never next to the saved analyses.
    assert API_KEY in storage(page, "sessionStorage")
    assert API_KEY not in storage(page, "localStorage")
    with page.expect_download() as download:
        page.get_by_test_id("export-button").click()
    path = tmp_path / "export.jsonl"
    download.value.save_as(path)
    assert API_KEY not in path.read_text()
    screenshots(page, "auth-ok")
    # A reload in the same tab keeps the session's key.
    page.reload()
    expect(page.get_by_test_id("lens-option")).to_have_count(4)
    # "remember" moves it to localStorage: a new tab of the same browser has it.
    enter_key(page, API_KEY, remember=True)
    expect(page.get_by_test_id("key-prompt")).to_contain_text("remembered")
    assert API_KEY in storage(page, "localStorage")
    other = page.context.new_page()
    other.goto(served.url)
    expect(other.get_by_test_id("lens-option")).to_have_count(4)
    other.close()


def test_a_401_on_an_analysis_is_shown_on_its_tab(page: Page, served: SimpleNamespace) -> None:
    page.goto(served.url)
    enter_key(page, API_KEY)
    expect(page.get_by_test_id("lens-option")).to_have_count(4)
    # The key changes (e.g. revoked) after the lenses were listed.
    page.get_by_test_id("api-key-input").fill("revoked-key")
    page.get_by_test_id("api-key-save").click()
    page.get_by_test_id("text-input").fill(TEXT)
    page.get_by_test_id("analyze-button").click()
    expect(page.get_by_test_id("tab")).to_have_attribute("data-status", "error")
    error = page.get_by_test_id("analysis").get_by_test_id("error")
    expect(error).to_have_attribute("data-status", "401")
    expect(error).to_contain_text("while analysing with lens")
    expect(error.get_by_role("button", name="Enter API key")).to_be_visible()


def test_a_429_shows_its_retry_time(page: Page, served: SimpleNamespace, screenshots: Any) -> None:
    headers = {"Authorization": f"Bearer {RATE_KEY}"}
    for _ in range(RATE_PER_MINUTE + 1):  # use up the key's bucket
        if served.client.get("/api/v2/groups", headers=headers).status_code == 429:
            break
    page.goto(served.url)
    enter_key(page, RATE_KEY)
    error = page.get_by_test_id("error")
    expect(error).to_have_attribute("data-status", "429")
    expect(error).to_have_attribute("data-code", "rate_limited")
    expect(error.get_by_test_id("retry-after")).to_contain_text("retry in")
    expect(error.get_by_role("button", name="Retry")).to_be_disabled()
    screenshots(page, "auth-429")

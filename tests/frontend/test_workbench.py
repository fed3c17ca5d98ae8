"""The web page in headless Chromium against the demo under real Serve, API keys off (issue 10).

One application for the module, under a route prefix (the page must work there too): the
demo qwen2 group plus a lens whose run directory is removed after start-up (its loads fail:
409), the demo gemma group, and a `page-busy` group that runs one request and queues one
(a third at once is refused: 503). Tests run in file order and share the page's server;
each test gets a fresh browser context (fresh storage). Screenshots of every view are
written to tests/frontend/screenshots/.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

from tests.deployments.conftest import wait_for
from tests.frontend.conftest import deploy

pytest.importorskip("playwright", reason="pip install -e '.[test]' installs playwright")
from playwright.sync_api import Locator, Page, expect  # noqa: E402

APP = "frontend-page"
PREFIX = "/page"
QWEN = "qwen2-tiny-l1"
DONOR_LENS = "qwen2-tiny-l1-donor"
GEMMA_GROUP = "gemma2-tiny"
BROKEN = "page-broken"  # its run directory is removed once the app is up
BUSY_GROUP = "page-busy"
BUSY = "page-busy-l1"
TEXT = "The quick brown fox jumps over the lazy dog."
LONG_TEXT = " ".join([TEXT] * 30)
GREEDY = {"temperature": 0.0, "seed": 1}


@pytest.fixture(scope="module")
def served(
    ray_cluster: Any,
    write_groups: Callable[..., Path],
    demo_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SimpleNamespace]:
    from ray import serve

    broken = tmp_path_factory.mktemp("page-runs") / BROKEN
    shutil.copytree(demo_dir / "lenses" / QWEN, broken)
    extra = {
        "qwen2-tiny": [
            {"id": BROKEN, "name": "broken on purpose", "checkpoint": str(broken), "layer": 1}
        ]
    }
    # Three lens slots: the gemma group (3 lenses) fits on its replica entirely.
    groups_dir = write_groups(
        ("qwen2-tiny", GEMMA_GROUP), replica={"max_lenses_per_replica": 3}, extra_lenses=extra
    )
    busy = yaml.safe_load((groups_dir / "qwen2-tiny.yaml").read_text())
    busy.update(group_id=BUSY_GROUP, name="busy: one running, one queued", donors=[])
    busy["replica"].update(max_ongoing_requests=1, max_queued_requests=1)
    busy["lenses"] = [
        {"id": BUSY, "name": BUSY, "checkpoint": str(demo_dir / "lenses" / QWEN), "layer": 1}
    ]
    (groups_dir / f"{BUSY_GROUP}.yaml").write_text(yaml.safe_dump(busy, sort_keys=False))
    deploy(APP, PREFIX, groups_dir, ray_cluster.http_url)
    shutil.rmtree(broken)
    base = ray_cluster.http_url + PREFIX
    with httpx.Client(base_url=base, timeout=120) as client:
        yield SimpleNamespace(url=base + "/", client=client)
    serve.delete(APP)


@pytest.fixture
def app(page: Page, served: SimpleNamespace) -> Page:
    """The page, loaded, with its groups listed."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The page's Content-Security-Policy must let everything the page does through.
    page.on(
        "console", lambda msg: "Content Security Policy" in msg.text and errors.append(msg.text)
    )
    page.goto(served.url)
    expect(page.get_by_test_id("group")).to_have_count(3)
    yield page
    assert not errors, errors  # no uncaught exception, no CSP refusal in the page


def lens(page: Page, lens_id: str) -> Locator:
    return page.locator(f'[data-testid="lens-option"][data-lens-id="{lens_id}"]')


def group(page: Page, group_id: str) -> Locator:
    return page.locator(f'[data-testid="group"][data-group-id="{group_id}"]')


def set_options(page: Page, prefix: str = "opt", **options: Any) -> None:
    """Fill analysis options (`opt-*`) or generation fields (`prefix="gen"`); bools tick boxes."""
    for name, value in options.items():
        field = page.get_by_test_id(f"{prefix}-{name}")
        if isinstance(value, bool):
            field.set_checked(value)
            continue
        if name == "batch_size":
            page.get_by_test_id("opt-batch-auto").set_checked(False)
        field.fill(str(value))


def start_analysis(page: Page, lens_id: str, text: str = TEXT, **options: Any) -> Locator:
    """Select the lens, enter the text and options, press Analyse; return the new tab."""
    lens(page, lens_id).click()
    page.get_by_test_id("text-input").fill(text)
    set_options(page, **{**GREEDY, **options})
    tabs = page.get_by_test_id("tab")
    before = tabs.count()
    page.get_by_test_id("analyze-button").click()
    expect(tabs).to_have_count(before + 1)
    return tabs.nth(before)


def api_rows(served: SimpleNamespace, lens_id: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = served.client.post(f"/api/v2/lenses/{lens_id}/analyze", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()["rows"]


def row_texts(page: Page) -> list[str]:
    rows = page.get_by_test_id("result-row")
    return rows.evaluate_all("rows => rows.map(r => r.innerText)")


# --- switcher ------------------------------------------------------------------------------------


def test_switcher_lists_every_group_and_lens(
    app: Page, served: SimpleNamespace, screenshots: Any
) -> None:
    groups = served.client.get("/api/v2/groups").json()["groups"]
    for g in groups:
        section = group(app, g["group_id"])
        expect(section).to_be_visible()
        expect(section).to_contain_text(g["name"])
        expect(section.get_by_test_id("group-switch-times")).to_be_visible()
        expect(section.get_by_test_id("lens-option")).to_have_count(len(g["lenses"]))
        for entry in g["lenses"]:
            option = lens(app, entry["lens_id"])
            expect(option).to_contain_text(entry["name"])
            expect(option).to_contain_text(f"layer {entry['layer']}")
            expect(option).to_have_attribute(
                "data-residency", re.compile("^(device|host|disk|failed)$")
            )
            estimate = option.get_by_test_id("switch-estimate")
            expect(estimate).to_have_attribute("data-source", re.compile("^(measured|estimated)$"))
            expect(estimate).to_contain_text(re.compile("switch|ready|cold start|failed"))
    # The group tooltip explains grouping (title for the pointer, a toggle for the keyboard).
    help_button = group(app, GEMMA_GROUP).get_by_role("button", name="What is a group?")
    assert "base model once" in help_button.get_attribute("title")
    help_button.click()
    expect(group(app, GEMMA_GROUP).get_by_role("tooltip")).to_be_visible()
    # Clicking a lens selects it; so does the keyboard.
    lens(app, DONOR_LENS).click()
    expect(lens(app, DONOR_LENS)).to_have_attribute("aria-checked", "true")
    expect(app.get_by_test_id("analyze-button")).to_contain_text(DONOR_LENS)
    lens(app, QWEN).focus()
    app.keyboard.press("Enter")
    expect(lens(app, QWEN)).to_have_attribute("aria-checked", "true")
    expect(lens(app, DONOR_LENS)).to_have_attribute("aria-checked", "false")
    screenshots(app, "switcher")


def test_a_preloaded_lens_shows_device(
    app: Page, served: SimpleNamespace, screenshots: Any
) -> None:
    resp = served.client.post("/api/v2/groups/qwen2-tiny/preload", json={"lens_ids": [QWEN]})
    assert resp.status_code == 200 and resp.json()["results"][0]["ok"], resp.text
    app.get_by_role("button", name="Refresh residency").click()
    expect(lens(app, QWEN)).to_have_attribute("data-residency", "device")
    expect(lens(app, QWEN).get_by_test_id("switch-estimate")).to_have_attribute(
        "data-kind", "ready"
    )
    # Preloading a whole group from the page: per-lens progress, then the group is loaded.
    gemma = group(app, GEMMA_GROUP)
    gemma.get_by_test_id("preload-button").click()
    expect(gemma.locator('[data-testid="preload-progress"][data-state="ok"]')).to_have_count(3)
    expect(gemma.get_by_test_id("group-loaded")).to_have_attribute("data-loaded", "true")
    for option in gemma.get_by_test_id("lens-option").all():
        expect(option).to_have_attribute("data-residency", "device")
    screenshots(app, "switcher-preloaded")


# --- analysis views ------------------------------------------------------------------------------


def test_an_analysis_fills_one_row_per_token_with_coloured_salience(
    app: Page, served: SimpleNamespace, screenshots: Any
) -> None:
    tab = start_analysis(app, QWEN, kl=True)
    expect(tab).to_have_attribute("data-status", "done")
    expected = api_rows(served, QWEN, {"text": TEXT, "options": GREEDY})
    rows = app.get_by_test_id("result-row")
    expect(rows).to_have_count(len(expected))
    positions = rows.evaluate_all("rows => rows.map(r => Number(r.dataset.position))")
    assert positions == [row["position"] for row in expected]
    table = app.get_by_test_id("result-table")
    words = table.locator("[data-salience]")
    expect(words).to_have_count(sum(len(row["explanation_tokens"]) for row in expected))
    shown = words.evaluate_all("ws => ws.map(w => Number(w.dataset.salience))")
    wanted = [v for row in expected for v in row["token_salience"]]
    assert shown == pytest.approx(wanted, rel=1e-4, abs=1e-6)
    colours = set(words.evaluate_all("ws => ws.map(w => getComputedStyle(w).backgroundColor)"))
    assert "rgba(0, 0, 0, 0)" not in colours and len(colours) > 1, colours
    expect(app.get_by_test_id("salience-legend")).to_be_visible()
    # Column toggles hide a column without re-rendering the rows.
    header = table.locator('[data-column="mse"]')
    expect(header).to_be_visible()
    app.get_by_test_id("column-mse").uncheck()
    expect(header).to_be_hidden()
    expect(rows).to_have_count(len(expected))
    app.get_by_test_id("column-mse").check()
    expect(header).to_be_visible()
    # Click-to-copy: a token cell puts the token on the clipboard.
    app.context.grant_permissions(["clipboard-read", "clipboard-write"])
    rows.nth(2).get_by_role("cell").nth(1).click()
    expect(app.get_by_test_id("toast")).to_contain_text("Copied")
    assert app.evaluate("navigator.clipboard.readText()") == expected[2]["token"]
    screenshots(app, "table")


def test_transposed_and_full_text_views(
    app: Page, served: SimpleNamespace, screenshots: Any
) -> None:
    tab = start_analysis(app, QWEN, logit_lens=True)
    expect(tab).to_have_attribute("data-status", "done")
    n_rows = app.get_by_test_id("result-row").count()
    n_words = app.get_by_test_id("result-table").locator("[data-salience]").count()
    app.get_by_test_id("view-transposed").click()
    view = app.get_by_test_id("transposed-view")
    expect(view).to_be_visible()
    expect(app.get_by_test_id("view-transposed")).to_have_attribute("aria-pressed", "true")
    expect(view.get_by_test_id("transposed-column")).to_have_count(n_rows)
    expect(view.locator("[data-salience]")).to_have_count(n_words)
    # Words are stacked: each column's words sit one under the other.
    tops = (
        view.get_by_test_id("transposed-column")
        .first.locator("[data-salience]")
        .evaluate_all("ws => ws.map(w => w.getBoundingClientRect().top)")
    )
    assert tops == sorted(tops) and len(set(tops)) == len(tops), tops
    screenshots(app, "transposed")
    # The toggle goes back to the table.
    app.get_by_test_id("view-transposed").click()
    expect(app.get_by_test_id("result-row")).to_have_count(n_rows)
    app.get_by_test_id("view-fulltext").click()
    tokens = app.get_by_test_id("fulltext-token")
    expect(tokens).to_have_count(n_rows)
    tokens.nth(3).hover()
    detail = app.get_by_test_id("fulltext-detail")
    expect(detail).to_contain_text("#3")
    expect(detail.locator("[data-salience]").first).to_be_visible()
    screenshots(app, "fulltext")


def test_export_jsonl_imports_back_into_an_identical_tab(
    app: Page, served: SimpleNamespace, screenshots: Any, tmp_path: Path
) -> None:
    tab = start_analysis(app, QWEN)
    expect(tab).to_have_attribute("data-status", "done")
    original = row_texts(app)
    meta_line = app.get_by_test_id("meta-line").inner_text()
    with app.expect_download() as download:
        app.get_by_test_id("export-button").click()
    path = tmp_path / "analysis.jsonl"
    download.value.save_as(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    head, meta, rows = lines[0], lines[1], lines[2:]
    assert head["event"] == "request" and head["lens_id"] == QWEN
    assert head["request"]["text"] == TEXT and head["request"]["options"]["seed"] == GREEDY["seed"]
    assert meta["event"] == "meta" and meta["meta"]["lens_id"] == QWEN
    assert [r["event"] for r in rows] == ["row"] * len(original)
    assert "Bearer" not in path.read_text() and "api_key" not in path.read_text()
    with app.expect_download() as csv_download:
        app.get_by_test_id("export-csv-button").click()
    csv_path = tmp_path / "analysis.csv"
    csv_download.value.save_as(csv_path)
    table = list(csv.DictReader(csv_path.open(newline="")))
    assert [int(r["position"]) for r in table] == [r["row"]["position"] for r in rows]

    app.get_by_test_id("import-input").set_input_files(str(path))
    tabs = app.get_by_test_id("tab")
    expect(tabs).to_have_count(2)
    expect(tabs.nth(1)).to_have_attribute("data-status", "done")
    expect(tabs.nth(1).get_by_role("tab")).to_contain_text(QWEN)
    expect(app.get_by_test_id("result-row")).to_have_count(len(original))
    assert row_texts(app) == original
    assert (
        app.get_by_test_id("meta-line").inner_text()
        == f"{meta_line} · imported from analysis.jsonl"
    )
    screenshots(app, "imported")


def test_analyses_survive_a_reload(app: Page) -> None:
    first = start_analysis(app, QWEN)
    expect(first).to_have_attribute("data-status", "done")
    second = start_analysis(app, "qwen2-tiny-l0-single", text="Another text to read.")
    expect(second).to_have_attribute("data-status", "done")
    second.get_by_test_id("tab-rename").click()
    app.get_by_test_id("tab-title-input").fill("renamed tab")
    app.get_by_test_id("tab-title-input").press("Enter")
    expect(second).to_contain_text("renamed tab")
    before = row_texts(app)
    app.reload()
    tabs = app.get_by_test_id("tab")
    expect(tabs).to_have_count(2)
    expect(tabs.nth(1)).to_contain_text("renamed tab")
    expect(app.get_by_test_id("result-row")).to_have_count(len(before))
    assert row_texts(app) == before
    tabs.nth(0).get_by_test_id("tab-close").click()
    expect(tabs).to_have_count(1)


# --- workflow ------------------------------------------------------------------------------------


def test_analyse_with_every_lens_opens_one_tab_per_lens(
    app: Page, served: SimpleNamespace, screenshots: Any
) -> None:
    groups = served.client.get("/api/v2/groups").json()["groups"]
    gemma_lenses = [
        e["lens_id"] for g in groups if g["group_id"] == GEMMA_GROUP for e in g["lenses"]
    ]
    assert len(gemma_lenses) == 3
    app.get_by_test_id("text-input").fill(TEXT)
    set_options(app, **GREEDY)
    group(app, GEMMA_GROUP).get_by_test_id("analyze-group-button").click()
    tabs = app.get_by_test_id("tab")
    expect(tabs).to_have_count(3)
    seen = []
    for index in range(3):
        expect(tabs.nth(index)).to_have_attribute("data-status", "done")
        tabs.nth(index).get_by_role("tab").click()
        seen.append(
            app.get_by_test_id("meta-line").inner_text().split(" · ")[0].removeprefix("lens ")
        )
        expect(app.get_by_test_id("result-row").first).to_be_visible()
    assert sorted(seen) == sorted(gemma_lenses)
    screenshots(app, "every-lens-tabs")
    # Compare two of them side by side, aligned by token.
    n_rows = app.get_by_test_id("result-row").count()
    app.get_by_test_id("compare-button").click()
    app.get_by_test_id("compare-show").click()
    view = app.get_by_test_id("compare-view")
    expect(view).to_be_visible()
    expect(view.get_by_test_id("compare-row")).to_have_count(n_rows)
    expect(view.get_by_test_id("salience-legend")).to_have_count(2)
    screenshots(app, "compare")
    app.get_by_test_id("compare-close").click()
    expect(view).to_have_count(0)


def test_generate_then_analyse_a_continuation(app: Page, screenshots: Any) -> None:
    lens(app, DONOR_LENS).click()
    app.get_by_test_id("text-input").fill("Once upon a time")
    set_options(app, **GREEDY)
    set_options(app, prefix="gen", max_new_tokens=6, num_continuations=2, seed=3)
    app.get_by_test_id("generate-button").click()
    continuations = app.get_by_test_id("continuation")
    expect(continuations).to_have_count(2)
    screenshots(app, "continuations")
    app.get_by_test_id("continuation-analyze").first.click()
    tab = app.get_by_test_id("tab").first
    expect(tab).to_have_attribute("data-status", "done")
    text = app.get_by_test_id("text-input").input_value()
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    assert app.get_by_test_id("meta-line").inner_text().startswith(f"lens {DONOR_LENS}")
    assert app.get_by_test_id("result-row").count() > 3


def test_chat_json_paste_switches_to_the_message_editor(app: Page, served: SimpleNamespace) -> None:
    messages = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi, how are you?"},
    ]
    box = app.get_by_test_id("text-input")
    box.fill("")
    box.evaluate(
        """(el, text) => {
            const data = new DataTransfer();
            data.setData("text/plain", text);
            const init = {clipboardData: data, bubbles: true, cancelable: true};
            el.dispatchEvent(new ClipboardEvent("paste", init));
        }""",
        json.dumps({"messages": messages}),
    )
    expect(app.get_by_test_id("chat-message")).to_have_count(2)
    expect(app.get_by_test_id("mode-chat")).to_be_checked()
    lens(app, QWEN).click()
    set_options(app, last_n_messages=1, **GREEDY)
    app.get_by_test_id("analyze-button").click()
    expect(app.get_by_test_id("tab").first).to_have_attribute("data-status", "done")
    options = {**GREEDY, "last_n_messages": 1}
    expected = api_rows(served, QWEN, {"messages": messages, "options": options})
    expect(app.get_by_test_id("result-row")).to_have_count(len(expected))


def test_out_of_bounds_options_are_refused_before_sending(app: Page) -> None:
    lens(app, QWEN).click()
    set_options(app, temperature=3, best_of_k=0)
    app.get_by_test_id("analyze-button").click()
    problems = app.get_by_test_id("input-problems")
    expect(problems).to_contain_text("temperature")
    expect(problems).to_contain_text("best_of_k")
    expect(app.get_by_test_id("tab")).to_have_count(0)


def test_cancel_stops_a_running_analysis(
    app: Page, served: SimpleNamespace, screenshots: Any
) -> None:
    tab = start_analysis(app, QWEN, text=LONG_TEXT, batch_size=1, best_of_k=4)
    progress = app.get_by_test_id("progress")
    expect(progress).to_be_visible()
    expect(progress).not_to_have_attribute("data-done", "0")
    screenshots(app, "progress")
    app.get_by_test_id("cancel-button").click()
    expect(tab).to_have_attribute("data-status", "cancelled")
    expect(progress).to_have_count(0)
    expect(app.get_by_test_id("cancelled-note")).to_be_visible()

    def idle() -> bool:
        replicas = served.client.get("/api/v2/groups/qwen2-tiny/status").json()["replicas"]
        return all(r["in_flight"] == 0 and r.get("busy_threads", 0) == 0 for r in replicas)

    wait_for(idle, timeout_s=60, what="the replica to stop the cancelled analysis")
    expect(tab).to_have_attribute("data-status", "cancelled")
    expect(app.get_by_test_id("result-row")).to_have_count(0)


# --- errors --------------------------------------------------------------------------------------


def test_a_lens_that_fails_to_load_shows_409(app: Page, screenshots: Any) -> None:
    tab = start_analysis(app, BROKEN)
    expect(tab).to_have_attribute("data-status", "error")
    error = app.get_by_test_id("analysis").get_by_test_id("error")
    expect(error).to_have_attribute("data-status", "409")
    expect(error).to_have_attribute("data-code", "missing_checkpoint")
    expect(error).to_contain_text(BROKEN)
    # The switcher learns it too: the lens is marked failed, with the reason.
    expect(lens(app, BROKEN)).to_have_attribute("data-residency", "failed")
    expect(lens(app, BROKEN).get_by_test_id("lens-failure")).to_contain_text("checkpoint")
    screenshots(app, "error-409")


def test_an_overloaded_group_shows_503_with_retry(app: Page, screenshots: Any) -> None:
    lens(app, BUSY).click()
    app.get_by_test_id("text-input").fill(" ".join([TEXT] * 10))
    set_options(app, batch_size=1, **GREEDY)
    for _ in range(4):  # one runs, one waits in the queue, the others are refused
        app.get_by_test_id("analyze-button").click()
    tabs = app.get_by_test_id("tab")
    expect(tabs).to_have_count(4)
    refused = app.locator('[data-testid="tab"][data-status="error"]')
    expect(refused.first).to_be_visible()
    refused.first.get_by_role("tab").click()
    error = app.get_by_test_id("analysis").get_by_test_id("error")
    expect(error).to_have_attribute("data-status", "503")
    expect(error).to_have_attribute("data-code", "overloaded")
    expect(error.get_by_role("button", name="Retry")).to_be_visible()
    screenshots(app, "error-503")
    for index in range(4):
        expect(tabs.nth(index)).to_have_attribute("data-status", re.compile("^(done|error)$"))


def test_a_dropped_connection_is_reported_and_recovered(app: Page) -> None:
    app.context.set_offline(True)
    app.get_by_role("button", name="Refresh residency").click()
    expect(app.get_by_test_id("connection")).to_contain_text("unreachable")
    expect(app.locator('[data-testid="error"][data-code="network_error"]')).to_be_visible()
    app.context.set_offline(False)
    app.get_by_role("button", name="Refresh residency").click()
    expect(app.get_by_test_id("connection")).to_have_text("connected")
    expect(app.get_by_test_id("group")).to_have_count(3)

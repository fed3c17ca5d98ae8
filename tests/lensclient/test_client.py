"""`lensclient` against a real lens-serve app (issue 9): DataFrames equal v2's JSON rows.

One application, `lens-serve-client`: the qwen demo group with an API key.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pandas as pd
import pytest

import lensclient
from lensclient import AsyncLensClient, LensClient

APP = "lens-serve-client"
PREFIX = "/clientapp"
KEY = "client-key-0123456789"
QWEN = "qwen2-tiny-l1"
QWEN_L0 = "qwen2-tiny-l0-single"
TEXT = "The quick brown fox jumps over the lazy dog."
LONG_TEXT = " ".join(["Researchers read what the model thinks at every token."] * 30)


@pytest.fixture(scope="module")
def url(
    ray_cluster: Any, write_groups: Any, wait_until: Any, tmp_path_factory: Any
) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_app

    keys = tmp_path_factory.mktemp("client-keys") / "keys"
    keys.write_text(f"{KEY}\n")
    args = {"groups_dir": str(write_groups(("qwen2-tiny",))), "api_keys_file": str(keys)}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    base = ray_cluster.http_url + PREFIX

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout_s=300, what=f"{APP} ready")
    yield base
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[LensClient]:
    with LensClient(url, api_key=KEY, timeout=120) as c:
        yield c


def test_the_client_imports_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, lensclient\n"
        "heavy = {'torch', 'ray', 'fastapi', 'lenscore', 'deployments', 'transformers'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_analyze_frame_equals_the_v2_rows(client: LensClient, url: str) -> None:
    options = {"temperature": 0, "seed": 1, "kl": True, "logit_lens": True}
    frame = client.analyze(QWEN, text=TEXT, **options)
    raw = httpx.post(f"{url}/api/v2/lenses/{QWEN}/analyze", json={"text": TEXT, "options": options},
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=120)  # fmt: skip
    rows = raw.json()["rows"]
    assert isinstance(frame, pd.DataFrame) and len(frame) == len(rows)
    assert list(frame.columns[:4]) == ["position", "token", "token_id", "explanation"]
    assert {"mse", "relative_rmse", "token_salience", "kl", "logit_lens_top"} <= set(frame.columns)
    assert frame.to_dict("records") == rows
    assert isinstance(frame["token_salience"].iloc[0], list)
    assert frame.attrs["meta"]["lens_id"] == QWEN
    assert frame.attrs["request"]["options"] == options
    assert frame.attrs["request"]["text"] == TEXT


def test_groups_and_lenses(client: LensClient) -> None:
    groups = client.groups()
    assert [g["group_id"] for g in groups] == ["qwen2-tiny"]
    lenses = client.lenses()
    assert QWEN in set(lenses["lens_id"]) and {"layer", "group_id"} <= set(lenses.columns)


def test_analyze_many_labels_each_row(client: LensClient) -> None:
    texts = [TEXT, "Hello there, general reader."]
    frame = client.analyze_many([QWEN, QWEN_L0], texts, progress=True, temperature=0, seed=2)
    assert list(frame.columns[:2]) == ["lens_id", "input"]
    assert set(zip(frame["lens_id"], frame["input"], strict=True)) == {
        (lens, i) for lens in (QWEN, QWEN_L0) for i in range(2)
    }
    one = client.analyze(QWEN_L0, text=texts[1], temperature=0, seed=2)
    part = frame[(frame["lens_id"] == QWEN_L0) & (frame["input"] == 1)]
    assert part.drop(columns=["lens_id", "input"]).to_dict("records") == one.to_dict("records")
    assert len(frame.attrs["meta"]) == 4


def test_jobs_result_events_and_cancel(client: LensClient) -> None:
    job = client.submit("analyze", QWEN, text=TEXT, temperature=0, seed=1)
    assert job.kind == "analyze" and job.id
    events = [kind for kind, _ in job.events()]
    assert events[-1] == "done"
    frame = job.result(timeout=120)
    assert frame.to_dict("records") == client.analyze(QWEN, text=TEXT, temperature=0, seed=1)\
        .to_dict("records")  # fmt: skip
    reply = client.submit("send_message", QWEN, messages=[{"role": "user", "content": "Hi"}],
                          max_new_tokens=4, temperature=0).result(timeout=120)  # fmt: skip
    assert isinstance(reply["response"], str)

    slow = client.submit("analyze", QWEN, text=LONG_TEXT, best_of_k=16, batch_size=1)
    slow.cancel()
    with pytest.raises(lensclient.Cancelled) as cancelled:
        slow.result(timeout=120)
    assert cancelled.value.code == "cancelled"


def test_errors_are_typed_with_the_api_code(client: LensClient, url: str) -> None:
    with pytest.raises(lensclient.NotFound) as unknown:
        client.analyze("nope", text=TEXT)
    assert unknown.value.code == "unknown_lens" and unknown.value.status == 404
    with pytest.raises(lensclient.BadRequest) as bad:
        client.analyze(QWEN, text=TEXT, temperature=5)
    assert bad.value.code == "bad_input"
    with LensClient(url, api_key="wrong") as stranger:
        with pytest.raises(lensclient.Unauthorized):
            stranger.groups()
    with pytest.raises(lensclient.NotFound):
        client.job("no-such-job")


def test_generate_and_send_message(client: LensClient) -> None:
    out = client.generate(QWEN, text=TEXT, max_new_tokens=3, temperature=0)
    assert len(out["continuations"]) == 1 and len(out["continuations"][0]["token_ids"]) == 3
    reply = client.send_message(QWEN, [{"role": "user", "content": "Hi"}], max_new_tokens=3)
    assert reply["stop_reason"] in ("end_of_turn", "max_tokens")


def test_async_client(url: str, client: LensClient) -> None:
    async def run() -> tuple[pd.DataFrame, pd.DataFrame, Any]:
        async with AsyncLensClient(url, api_key=KEY, timeout=120) as aio:
            frame = await aio.analyze(QWEN, text=TEXT, temperature=0, seed=4)
            many = await aio.analyze_many(QWEN, [TEXT, TEXT], progress=False, temperature=0,
                                          seed=4)  # fmt: skip
            job = await aio.submit("generate", QWEN, text=TEXT, max_new_tokens=2, temperature=0)
            return frame, many, await job.result(timeout=120)

    # Its own thread and loop: other test modules (the browser tests) may leave this
    # thread's event loop running, as a notebook does.
    with ThreadPoolExecutor(max_workers=1) as pool:
        frame, many, generated = pool.submit(asyncio.run, run()).result(timeout=300)
    expected = client.analyze(QWEN, text=TEXT, temperature=0, seed=4).to_dict("records")
    assert frame.to_dict("records") == expected
    assert len(many) == 2 * len(frame)
    assert generated["continuations"][0]["token_ids"]

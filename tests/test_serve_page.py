"""The browser chat page at `/` over plain HTTP (no browser needed): it is served as HTML from the
package data, it is public even when the API needs a key, and the API around it is unchanged.
The page itself is driven in real Chromium by test_browser.py."""
from __future__ import annotations

import importlib.resources

import httpx
import pytest

from dsv32.serve.app import create_app
from serve_common import InProcessServer, ScriptedEngine, small_tokenizer


@pytest.fixture(scope="module")
def server():
    engine = ScriptedEngine(small_tokenizer(), lambda prompt: "Hello.")
    srv = InProcessServer(create_app(engine, small_tokenizer(), model_name="page-test", api_key="sekret"))
    yield srv
    srv.close()


def test_page_is_package_data():
    page = importlib.resources.files("dsv32.serve").joinpath("static", "chat.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    # no build step and nothing fetched from elsewhere: one self-contained file over the same-origin API
    assert "/v1/chat/completions" in page and "/v1/models" in page
    for remote in ("http://", "https://", "<script src", "<link rel=\"stylesheet\""):
        assert remote not in page.replace("http://www.w3.org/2000/svg", ""), remote
    assert "innerHTML" not in page  # model output goes in as text only


def test_root_serves_the_page_without_a_key(server):
    r = httpx.get(server.url + "/", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<title>dsv32 chat</title>" in r.text and 'id="composer"' in r.text


def test_api_unchanged_around_the_page(server):
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401  # the key still guards /v1
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer sekret"}, timeout=30)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "page-test"
    missing = httpx.get(server.url + "/nope", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.post(server.url + "/", timeout=30).status_code == 405
    body = {"model": "page-test", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello."

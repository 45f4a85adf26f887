"""A careless or hostile client against the tiny models: every row of issue 12's table as a test of the fix.

Bad text is a 400 naming the field on every route; masks are readable only by the request's owner; gauges
return to 0; each request's cost is priced at admission; a costly fill-mask is sliced so a cheap one answers
meanwhile; grammar compiles run off the compute thread, with a time limit.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.mask_store import MaskStore
from service.config import Settings
from service.engine.fill.codec import FillMaskCodec
from service.engine.fill.worker import WORKER
from service.engine.loading import LoadedModel
from tests.integration.apps import create_test_app
from tests.integration.live import live_server

LONE = "\ud800"  # a lone surrogate: valid JSON ("\ud800"), no UTF-8 form
MASK = "<mask>"


@pytest.fixture(scope="module")
def client(mntp_settings: Settings, tiny_mntp: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_test_app(mntp_settings, loaded=tiny_mntp)) as c:
        yield c


def post(client: TestClient, url: str, body: dict[str, Any], **kw: Any) -> Any:
    """POST ``body`` as ASCII JSON: a lone surrogate travels as the escape ``\\ud800``, as a client would send it."""
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return client.post(url, content=json.dumps(body), headers=headers, **kw)


# --- text the tokenizer cannot take ---------------------------------------------------------------------------

FILL = f"The {MASK} barked."
GEN = {"prompt": "Hello", "max_new_tokens": 2}
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BAD_TEXT = [
    ("/v1/fill-mask", {"inputs": f"The {MASK} {LONE}"}, "inputs"),
    ("/v1/fill-mask", {"inputs": [FILL, f"{LONE} {MASK}"]}, "inputs[1]"),
    ("/v1/fill-mask", {"inputs": FILL, "parameters": {"targets": ["dog", LONE]}}, "parameters.targets[1]"),
    ("/v1/generate", {**GEN, "prompt": LONE}, "prompt"),
    ("/v1/generate", {**GEN, "prompt": LONE, "stream": True}, "prompt"),
    ("/v1/generate", {"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
    ("/v1/generate", {**GEN, "bad_words": ["ok", LONE]}, "bad_words[1]"),
    ("/v1/generate", {**GEN, "choice": [LONE]}, "choice[0]"),
    ("/v1/generate", {**GEN, "stop": [LONE]}, "stop[0]"),
    ("/v1/completions", {"model": "m", "prompt": LONE, "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"model": "m", "prompt": LONE, "max_tokens": 2, "stream": True}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": LONE}], "stream": True},
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
        "messages[0].content[0].text",
    ),
    ("/v1/masks", {"endpoint": "fill-mask", "request": {"inputs": f"{MASK}{LONE}"}}, "request.inputs"),
    ("/v1/masks", {"endpoint": "generate", "request": {"prompt": LONE}}, "request.prompt"),
    ("/v1/generate", {**GEN, "logit_bias": {LONE: 1.0}}, "logit_bias"),
]


@pytest.mark.parametrize(("url", "body", "param"), BAD_TEXT, ids=[f"{u}:{p}" for u, _, p in BAD_TEXT])
def test_text_without_utf8_form_is_a_400_naming_the_field(
    client: TestClient, url: str, body: dict[str, Any], param: str
) -> None:
    r = post(client, url, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["code"] == "invalid_text"
    assert "not valid Unicode" in err["message"]


def test_raw_bytes_that_are_not_utf8_are_a_400(client: TestClient) -> None:
    r = client.post("/v1/generate", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "error" in r.json()


def test_valid_text_beyond_the_bmp_still_works(client: TestClient) -> None:
    r = post(client, "/v1/generate", {**GEN, "prompt": "\U0001f600 \u00e9"})
    assert r.status_code == 200, r.text


# --- masks are private ------------------------------------------------------------------------------------------


def test_without_keys_only_asked_for_masks_are_kept_under_a_server_id(client: TestClient) -> None:
    plain = post(client, "/v1/generate", GEN)
    assert plain.status_code == 200
    assert "x-masks-id" not in plain.headers
    assert client.get(f"/v1/masks/{plain.json()['id']}").status_code == 404  # not asked for: not kept
    asked = post(client, "/v1/generate", {**GEN, "return_masks": True})
    gen_id = asked.json()["id"]
    assert asked.headers["x-masks-id"] == gen_id
    assert client.get(f"/v1/masks/{gen_id}").json()["tokens"] == asked.json()["masks"]["tokens"]


def test_a_clients_request_id_is_a_label_never_the_storage_key(client: TestClient) -> None:
    body = {"inputs": FILL, "return_masks": True}
    first = post(client, "/v1/fill-mask", body, headers={"X-Request-ID": "req-1"})
    second = post(client, "/v1/fill-mask", {**body, "inputs": f"A {MASK}."}, headers={"X-Request-ID": "req-1"})
    assert first.headers["x-request-id"] == second.headers["x-request-id"] == "req-1"  # echoed for correlation
    assert client.get("/v1/masks/req-1").status_code == 404
    ids = [first.json()["id"], second.json()["id"]]
    assert ids[0] != ids[1]
    assert all(i.startswith("fm-") and len(i) == 35 for i in ids)  # fm- + 128 random bits in hex
    kept = [client.get(f"/v1/masks/{i}").json()["text"] for i in ids]
    assert kept == [FILL, f"A {MASK}."]  # the second did not overwrite the first


def test_with_keys_masks_are_served_only_to_the_same_key(mntp_settings: Settings, tiny_mntp: LoadedModel) -> None:
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with TestClient(create_test_app(mntp_settings.model_copy(update={"api_keys": ["key-a", "key-b"]}), tiny_mntp)) as c:
        private = post(c, "/v1/generate", {**GEN, "prompt": "my secret"}, headers=a)
        assert private.status_code == 200
        request_id = private.json()["id"]
        assert private.headers["x-masks-id"] == request_id  # with keys every request's report is kept
        stolen = c.get(f"/v1/masks/{request_id}", headers=b)
        assert stolen.status_code == 404
        assert "secret" not in stolen.text
        assert c.get(f"/v1/masks/{request_id}", headers=a).json()["text"] == "my secret"
        filled = post(c, "/v1/fill-mask", {"inputs": FILL}, headers=a)
        fm_id = filled.headers["x-masks-id"]
        assert c.get(f"/v1/masks/{fm_id}", headers=b).status_code == 404
        assert c.get(f"/v1/masks/{fm_id}", headers=a).status_code == 200


def test_a_stored_report_cannot_be_overwritten() -> None:
    store = MaskStore(4)
    assert store.put("gen-1", lambda dense: {"who": "first"}, owner="a")
    assert not store.put("gen-1", lambda dense: {"who": "second"}, owner="a")
    assert not store.put("gen-1", lambda dense: {"who": "third"}, owner="b")
    report = store.get("gen-1", "a")
    assert report is not None
    assert report(False) == {"who": "first"}
    assert store.get("gen-1", "b") is None


# --- gauges -----------------------------------------------------------------------------------------------------


def gauges(client: TestClient | httpx.Client) -> dict[tuple[str, str], float]:
    values = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name in {"maskserve_running_requests", "maskserve_queue_depth"}:
            for sample in family.samples:
                values[(family.name, sample.labels["worker"])] = sample.value
    return values


def test_running_and_queued_gauges_return_to_zero_at_rest(client: TestClient) -> None:
    fill = {"inputs": FILL, "parameters": {"whole_word": True, "top_k": 3}}
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: post(client, "/v1/fill-mask", fill), range(20)))
        answers += list(pool.map(lambda i: post(client, "/v1/generate", GEN), range(8)))
    assert [a.status_code for a in answers] == [200] * 28
    values = gauges(client)
    assert values[("maskserve_running_requests", "fill_mask")] == 0
    assert values[("maskserve_queue_depth", "fill_mask")] == 0
    assert values[("maskserve_running_requests", "generate")] == 0
    assert values[("maskserve_queue_depth", "generate")] == 0


# --- bounded cost, priced at admission --------------------------------------------------------------------------


def schema(n: int, prefix: str = "p") -> dict[str, Any]:
    return {"type": "object", "properties": {f"{prefix}{i}": {"type": "integer"} for i in range(n)}}


def assert_refused(r: Any, param: str, code: str = "too_costly") -> None:
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)


def test_a_thousand_inputs_are_refused_before_any_work(client: TestClient) -> None:
    body = {"inputs": [f"The {MASK} " * 8] * 1000, "parameters": {"whole_word": True, "top_k": 100}}
    assert_refused(post(client, "/v1/fill-mask", body), "inputs")


def test_eight_whole_word_masks_at_top_k_100_are_refused(client: TestClient) -> None:
    body = {"inputs": f"The {MASK} " * 8, "parameters": {"whole_word": True, "top_k": 100}}
    r = post(client, "/v1/fill-mask", body)
    assert_refused(r, "parameters.top_k")
    assert "4832 sequences" in r.json()["error"]["message"]  # 8 masks x (4 + 100 x 4 x 3 / 2)


def test_the_rerank_is_priced_where_it_applies(mntp_settings: Settings, tiny_mntp: LoadedModel) -> None:
    """One mask: 2 + 20 x 2 x 1 / 2 search rows + 20 rerank rows = 42; two masks are not reranked: 2 x 22."""
    settings = mntp_settings.model_copy(update={"fill_rerank": True, "max_fill_rows": 41})
    body = {"inputs": f"The {MASK} barked.", "parameters": {"whole_word": True, "top_k": 20, "max_word_tokens": 2}}
    with TestClient(create_test_app(settings, tiny_mntp)) as c:
        r = post(c, "/v1/fill-mask", body)
        assert_refused(r, "parameters.top_k")
        assert "forward 42 sequences" in r.json()["error"]["message"]
        two = post(c, "/v1/fill-mask", {**body, "inputs": f"The {MASK} barked at the {MASK}."})
        assert "forward 44 sequences" in two.json()["error"]["message"]
    with TestClient(create_test_app(settings.model_copy(update={"max_fill_rows": 42}), tiny_mntp)) as c:
        assert post(c, "/v1/fill-mask", body).status_code == 200


def test_targets_are_priced_by_their_sub_tokens(mntp_settings: Settings, tiny_mntp: LoadedModel) -> None:
    codec = FillMaskCodec(tiny_mntp, mntp_settings)
    encoded = [codec.encode_target(w, "t", 4) for w in ("dog", "cat")]
    pieces = sum(max(len(t.spaced), len(t.bare)) for t in encoded)  # a row per sub-token, either spelling
    app = create_test_app(mntp_settings.model_copy(update={"max_fill_rows": pieces}), tiny_mntp)
    with TestClient(app) as c:
        body = {"inputs": f"a {MASK} and {MASK}", "parameters": {"targets": ["dog", "cat"]}}
        r = post(c, "/v1/fill-mask", body)
        assert_refused(r, "parameters.targets")
        assert f"forward {2 * pieces} sequences" in r.json()["error"]["message"]
        assert post(c, "/v1/fill-mask", {**body, "inputs": f"a {MASK}"}).status_code == 200


def test_a_schema_of_3000_properties_is_refused_on_every_route(client: TestClient) -> None:
    big = schema(3000)
    assert_refused(post(client, "/v1/generate", {**GEN, "json_schema": big}), "json_schema")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": big}}
    chat = {**CHAT, "model": client.app.state.engine.model_id, "response_format": fmt}  # type: ignore[attr-defined]
    assert_refused(post(client, "/v1/chat/completions", chat), "response_format.json_schema.schema")
    dry = {"endpoint": "generate", "request": {**GEN, "json_schema": schema(300)}}
    assert_refused(post(client, "/v1/masks", dry), "json_schema")
    assert_refused(post(client, "/v1/generate", {**GEN, "regex": "a" * 2000}), "regex")


def test_a_grammar_that_does_not_compile_in_time_is_a_400(mntp_settings: Settings, tiny_mntp: LoadedModel) -> None:
    app = create_test_app(mntp_settings.model_copy(update={"grammar_compile_timeout_s": 1e-6}), tiny_mntp)
    with TestClient(app) as c:
        r = post(c, "/v1/generate", {**GEN, "json_schema": schema(40, "slow")})
        assert_refused(r, "json_schema", "grammar_timeout")
        assert post(c, "/v1/generate", GEN).status_code == 200  # the server goes on


def test_new_property_names_do_not_grow_the_grammar_cache(mntp_settings: Settings, tiny_mntp: LoadedModel) -> None:
    app = create_test_app(mntp_settings.model_copy(update={"grammar_cache_size": 3}), tiny_mntp)
    with TestClient(app) as c:
        for i in range(8):
            assert post(c, "/v1/generate", {**GEN, "json_schema": schema(3, f"n{i}_")}).status_code == 200
        assert len(app.state.engine.require_generation().vocab.grammars) == 3


# --- fairness and cancellation ----------------------------------------------------------------------------------

COSTLY = {"inputs": f"The {MASK} " * 8, "parameters": {"whole_word": True, "top_k": 20}}  # 992 rows, admitted
CHEAP = {"inputs": FILL}


def fill_forwards(client: TestClient | httpx.Client) -> float:
    """Forwards the fill-mask worker has run (the batch-size histogram's count)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "maskserve_batch_size":
            return sum(s.value for s in family.samples if s.name.endswith("_count") and s.labels["worker"] == WORKER)
    return 0.0


def wait_until_running(client: TestClient, worker: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while gauges(client).get(("maskserve_running_requests", worker), 0) < 1:
        assert time.monotonic() < deadline, "the costly request never started"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def sliced(mntp_settings: Settings, tiny_mntp: LoadedModel) -> Iterator[TestClient]:
    """One row of a job per round: the costly request takes ~1000 rounds, so others visibly interleave."""
    settings = mntp_settings.model_copy(update={"max_fill_rows_per_round": 1})
    with TestClient(create_test_app(settings, loaded=tiny_mntp)) as c:
        yield c


def test_a_cheap_fill_mask_answers_while_a_costly_one_runs(sliced: TestClient) -> None:
    rss_before = psutil.Process().memory_info().rss
    with ThreadPoolExecutor(2) as pool:
        costly = pool.submit(post, sliced, "/v1/fill-mask", COSTLY)
        wait_until_running(sliced, WORKER)
        started = time.monotonic()
        cheap = post(sliced, "/v1/fill-mask", CHEAP)
        took = time.monotonic() - started
        assert cheap.status_code == 200
        assert not costly.done()  # answered between the costly one's slices, not after it
        gen = post(sliced, "/v1/generate", GEN)  # decode ticks take turns on the compute thread too
        assert gen.status_code == 200
        assert not costly.done()
        assert costly.result().status_code == 200
    assert took < 10  # a stall would be the costly request's whole duration; generous, so it cannot flake
    assert psutil.Process().memory_info().rss - rss_before < 500 * 2**20


def test_a_timed_out_fill_mask_stops_between_slices(mntp_settings: Settings, tiny_mntp: LoadedModel) -> None:
    settings = mntp_settings.model_copy(update={"max_fill_rows_per_round": 1, "request_timeout_s": 0.3})
    with TestClient(create_test_app(settings, loaded=tiny_mntp)) as c:
        r = post(c, "/v1/fill-mask", COSTLY)
        assert r.status_code == 504
        time.sleep(0.2)  # the round in flight when it timed out may still finish
        after = fill_forwards(c)
        time.sleep(0.5)
        assert fill_forwards(c) == after  # no further slice ran
        values = gauges(c)
        assert values[("maskserve_running_requests", WORKER)] == 0
        assert post(c, "/v1/fill-mask", CHEAP).status_code == 200


def test_costly_jobs_run_together_only_within_the_row_budget(mntp_settings: Settings, tiny_mntp: LoadedModel) -> None:
    """Each running job holds its current step's outputs: two costly ones beyond MASKSERVE_MAX_FILL_ROWS take
    turns (one waits, counted as queued), so a round's memory stays bounded; a cheap one still joins at once."""
    settings = mntp_settings.model_copy(update={"max_fill_rows_per_round": 1, "max_fill_rows": 130})
    one = {"inputs": f"The {MASK} barked.", "parameters": {"whole_word": True, "top_k": 20}}  # 4 + 20 x 6 = 124
    with TestClient(create_test_app(settings, loaded=tiny_mntp)) as c, ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(post, c, "/v1/fill-mask", one) for _ in range(2)]
        seen = []
        while not all(j.done() for j in jobs):
            values = gauges(c)
            key = ("maskserve_running_requests", WORKER), ("maskserve_queue_depth", WORKER)
            seen.append((values.get(key[0], 0), values.get(key[1], 0)))
            if len(seen) == 3:
                assert post(c, "/v1/fill-mask", CHEAP).status_code == 200
        assert [j.result().status_code for j in jobs] == [200, 200]
    assert max(running for running, _ in seen) == 1  # never both costly at once (the cheap one is not sampled)
    assert (1, 1) in seen  # one ran while the other waited


def test_a_client_that_leaves_stops_its_fill_mask_on_a_live_server(
    tiny_llama_dir: Path, tiny_mntp_adapter_dir: Path, tmp_path: Path
) -> None:
    """Over a real socket: the costly request's client closes the connection mid-search; the server drops the
    job before its next slice (no more forwards, the gauge back to 0) instead of finishing ~1000 rounds."""
    env = {
        "MASKSERVE_MODEL": str(tiny_llama_dir),
        "MASKSERVE_ADAPTER": str(tiny_mntp_adapter_dir),
        "MASKSERVE_MAX_FILL_ROWS_PER_ROUND": "1",
        "MASKSERVE_LOG_LEVEL": "warning",
    }
    with (
        live_server(["-m", "service.cli", "serve"], env, tmp_path / "server.log") as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):

        def running() -> float:
            return gauges(http).get(("maskserve_running_requests", WORKER), 0)

        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps(COSTLY).encode()
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(
                b"POST /v1/fill-mask HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + 10
            while running() < 1:
                assert time.monotonic() < deadline, "the costly request never started"
                time.sleep(0.01)
        left = time.monotonic()  # the connection is closed here
        while running() > 0:
            assert time.monotonic() - left < 5, "the search kept running after its client left"
            time.sleep(0.02)
        after = fill_forwards(http)
        time.sleep(0.5)
        assert fill_forwards(http) == after  # no slice ran after the job was dropped
        assert http.post("/v1/fill-mask", json=CHEAP).status_code == 200

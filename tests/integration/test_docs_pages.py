"""/docs and /redoc are served whole by the service: every URL in their HTML is the service's own, and each answers."""

from __future__ import annotations

import re
from importlib.resources import files

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.docs_pages import ASSETS
from service.engine.loading import LoadedModel

PAGES = ["/docs", "/redoc", "/docs/oauth2-redirect"]


@pytest.fixture(scope="module")
def client(llama_settings: Settings, tiny_llama: LoadedModel) -> TestClient:
    return TestClient(create_app(llama_settings, loaded=tiny_llama))


def _references(html: str) -> list[str]:
    """Every URL the page loads or links: src/href attributes and the quoted URLs its inline script passes on."""
    attributes = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    script_urls = re.findall(
        r"""\b(?:url|oauth2RedirectUrl|spec-url)\s*[:=]\s*(?:window\.location\.origin\s*\+\s*)?["']([^"']+)["']""", html
    )
    return attributes + script_urls


@pytest.mark.parametrize("path", PAGES)
def test_page_holds_no_outside_url(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    # no absolute URL at all (FastAPI's defaults name cdn.jsdelivr.net and fastapi.tiangolo.com), and no
    # protocol-relative one
    assert re.findall(r"https?://", response.text) == []
    assert re.findall(r"""["']//""", response.text) == []


def test_pages_load_only_the_services_own_files(client: TestClient) -> None:
    swagger = _references(client.get("/docs").text)
    redoc = _references(client.get("/redoc").text)
    assert sorted(swagger) == [
        "/docs/assets/favicon.png",
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
        "/docs/oauth2-redirect",
        "/openapi.json",
    ]
    assert sorted(redoc) == ["/docs/assets/favicon.png", "/docs/assets/redoc.standalone.js", "/openapi.json"]
    for url in set(swagger + redoc):
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_assets_are_the_pinned_packages_files(client: TestClient, name: str) -> None:
    response = client.get(f"/docs/assets/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSETS[name]
    assert response.content == (files("fastapi_offline") / "static" / name).read_bytes()
    assert len(response.content) > 1000


def test_swagger_ui_validator_is_off(client: TestClient) -> None:
    # Swagger UI's default validator badge fetches validator.swagger.io
    assert '"validatorUrl": null' in client.get("/docs").text


@pytest.mark.parametrize("name", ["missing.js", "..%2Fcore.py", "%2E%2E%2F__init__.py"])
def test_unknown_asset_is_a_404_in_the_error_shape(client: TestClient, name: str) -> None:
    response = client.get(f"/docs/assets/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_asset_urls_follow_the_root_path(llama_settings: Settings, tiny_llama: LoadedModel) -> None:
    # behind a proxy that strips /maskserve, the page must ask for /maskserve/docs/assets/...
    client = TestClient(create_app(llama_settings, loaded=tiny_llama), root_path="/maskserve")
    refs = _references(client.get("/docs").text)
    assert len(refs) == 5
    assert all(ref.startswith("/maskserve/") for ref in refs)


@pytest.mark.parametrize("path", PAGES)
def test_pages_allow_loads_from_the_service_only(client: TestClient, path: str) -> None:
    # ReDoc's bundle hard-codes a logo from cdn.redoc.ly: the policy keeps the browser from asking for it
    policy = client.get(path).headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["img-src"] == "'self' data:"
    assert not re.search(r"https?:|\*", policy)

"""The mask pictures, read back as images (Pillow): the emphasis bias is drawn as a colour scale, constrained
tokens are marked on both axes, and the output masks' decode steps have a picture of their own."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel
from service.masks.inspect import MARK_COLOURS, cell_centre

PROMPT = "the dog sees the red ball. the teacher paints a tall mountain. my friend"


@pytest.fixture(scope="module")
def client(llama_settings: Settings, tiny_llama: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(llama_settings, loaded=tiny_llama)) as c:
        yield c


def picture(client: TestClient, attention: dict[str, object]) -> tuple[dict[str, object], Image.Image]:
    body = {"endpoint": "generate", "request": {"prompt": PROMPT, "attention": attention}}
    report = client.post("/v1/masks", json=body).json()
    png = client.post("/v1/masks?format=png", json=body)
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    return report, Image.open(io.BytesIO(png.content)).convert("RGB")


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def test_emphasized_key_columns_are_drawn_differently(client: TestClient) -> None:
    start = PROMPT.index("the teacher")
    end = start + len("the teacher paints")
    report, image = picture(client, {"emphasis": {"spans": [{"start": start, "end": end}], "factor": 4}})
    att = report["attention"]
    assert isinstance(att, dict)
    n = att["query_length"]
    [[a, b]] = att["constraints"]["emphasis"]
    emphasized = set(range(a, b))
    # The last query attends every key (causal): read its row, one pixel per key column.
    row = [image.getpixel(cell_centre(*image.size, n - 1, s, n, n)) for s in range(n)]
    inside = {row[s] for s in emphasized}
    outside = {row[s] for s in range(n) if s not in emphasized}
    assert len(inside) == 1, inside  # one colour each ...
    assert len(outside) == 1, outside
    assert inside != outside  # ... and not the same one
    assert (255, 255, 255) not in inside | outside  # attended cells are never white
    # a blocked cell (the first query may not attend the last key) is white
    assert image.getpixel(cell_centre(*image.size, 0, n - 1, n, n)) == (255, 255, 255)
    # the emphasized tokens are marked above their columns, in the emphasis colour
    x, y = cell_centre(*image.size, 0, a, n, n)
    top = image.getpixel((x, int(image.size[1] * (1 - 0.2 - 0.6)) - 3))
    assert top == hex_rgb(MARK_COLOURS["emphasis"])


def test_plain_and_excluded_masks(client: TestClient) -> None:
    start = PROMPT.index("the teacher")
    report, image = picture(client, {"exclude": [{"start": start, "end": start + len("the teacher")}]})
    att = report["attention"]
    assert isinstance(att, dict)
    n = att["query_length"]
    [[a, b]] = att["constraints"]["exclude"]
    row = [image.getpixel(cell_centre(*image.size, n - 1, s, n, n)) for s in range(n)]
    assert {row[s] for s in range(a, b)} == {(255, 255, 255)}  # later queries may not attend excluded keys
    assert {row[s] for s in range(a)} == {(0, 0, 0)}  # no bias: the plain black-and-white picture
    _, y = cell_centre(*image.size, a, 0, n, n)
    y += int(image.size[1] * 0.6 / n / 3)  # off the row's centre, where the tick mark is
    left = int(image.size[0] * 0.2) - 4
    assert image.getpixel((left, y)) == hex_rgb(MARK_COLOURS["exclude"])  # marked on the query axis too


def test_output_steps_picture(client: TestClient) -> None:
    body = {"prompt": "the dog sees the dog", "max_new_tokens": 6, "no_repeat_ngram_size": 2, "return_masks": True}
    data = client.post("/v1/generate", json=body).json()
    png = client.get(f"/v1/masks/{data['id']}?format=png&picture=output")
    assert png.status_code == 200
    image = Image.open(io.BytesIO(png.content))
    assert image.size[0] > 100
    unrecorded = client.post("/v1/generate", json={**body, "return_masks": False}).json()
    r = client.get(f"/v1/masks/{unrecorded['id']}?format=png&picture=output")
    assert r.status_code == 404  # without API keys only requests that asked for return_masks are kept
    dry = client.post("/v1/masks?format=png&picture=output", json={"endpoint": "generate", "request": body})
    assert dry.status_code == 400

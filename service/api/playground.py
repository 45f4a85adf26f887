"""``GET /playground``: a plain HTML/JS page to try fill-mask and generation with masks and see them drawn."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["service"])
PAGE = Path(__file__).resolve().parent.parent / "web" / "playground.html"


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/playground", response_class=HTMLResponse, summary="Interactive playground (HTML)")
async def playground() -> HTMLResponse:
    return HTMLResponse(_page())

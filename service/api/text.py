"""The one check of request text the tokenizer cannot take, applied to every route (an app-wide dependency).

JSON may carry ``"\\ud800"``: a lone UTF-16 surrogate, which Python's ``json`` decodes into a ``str`` that has no
UTF-8 form. Tokenizers raise ``TypeError`` on it deep inside a job (a 500, and a traceback per request), and
so would logging or echoing it. One walk over the parsed JSON body, before any field is validated or any
work starts, finds every such string, wherever it is (prompt, inputs, chat content, targets, stop, bad words,
choices, a dry run's inner request, even an object key), and answers 400 naming the first one. Raw bytes that
are not UTF-8 never get this far: the JSON parser refuses them (400).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from service.errors import InvalidRequest


def first_unencodable(value: Any, path: str = "") -> tuple[str, int] | None:
    """The path (``messages[0].content``) of the first string in ``value`` without a UTF-8 form, and the
    character where it fails; None when every string is fine."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:  # iterative: a deep body must not exhaust the recursion limit
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return where, exc.start
        elif isinstance(item, dict):
            entries = list(item.items())
            for key, child in reversed(entries):  # reversed: pop() then visits them in order
                stack.append((f"{where}.{key}" if where else str(key), child))
            for key, _ in entries:
                stack.append((where, key))  # keys too (reported at their object)
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", child) for i, child in reversed(list(enumerate(item))))
    return None


async def reject_unencodable_text(request: Request) -> None:
    """App-wide dependency: 400 naming the field whose text has no UTF-8 form (see the module docstring)."""
    if request.method not in {"POST", "PUT", "PATCH"}:
        return
    raw = await request.body()  # a failed read (e.g. over MASKSERVE_MAX_BODY_BYTES) propagates: it is answered
    if not raw:
        return
    try:
        body = await request.json()  # cached by Starlette: the route's body field parsed it already
    except ValueError:
        return  # not JSON (or malformed): the route's own parsing answers that
    found = first_unencodable(body)
    if found is not None:
        param, at = found
        name = f"'{param}'" if param else "the request body"
        raise InvalidRequest(
            f"{name} contains text that is not valid Unicode (a lone surrogate at character {at}); send UTF-8 text",
            param=param or None,
            code="invalid_text",
        )

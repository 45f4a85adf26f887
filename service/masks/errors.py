"""The one error a mask builder raises: a mask that cannot work for this request."""

from __future__ import annotations


class MaskError(ValueError):
    """A mask that cannot work; ``param`` names the request field (``attention.exclude[1]``, ``bad_words[2]``).

    The API answers it with a 400 whose ``param`` is that field (``service/errors.py``).
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

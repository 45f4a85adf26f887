"""Wire model of ``POST /v1/masks``: a request to inspect, as another endpoint would take it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Format = Literal["json", "png"]
Picture = Literal["mask", "weights", "output"]


class MasksRequest(BaseModel):
    endpoint: Literal["generate", "fill-mask"] = Field(description="Which endpoint the request is for.")
    request: dict[str, Any] = Field(description="The request body, exactly as that endpoint takes it.")
    dense: bool = Field(False, description="Also the dense 0/1 attention matrix (prompts of up to 512 tokens).")
    attention_weights: bool = Field(
        False,
        description="Also run the prompt through the model once and report its attention weights, averaged "
        "over heads (prompts of up to 512 tokens; fill-mask: the first input).",
    )
    attention_layer: int | None = Field(
        None, ge=0, description="The layer whose weights to report; default: the mean over all layers."
    )

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "endpoint": "generate",
                    "request": {
                        "prompt": "Old memo: Monday. New memo: Friday. The day is",
                        "attention": {"exclude": [{"start": 0, "end": 17}]},
                    },
                }
            ]
        }
    }

"""The wire models: pydantic requests and responses, validation and examples for /docs, nothing else.

No torch, no tokenizer, no model here (a test imports every module of this package in a fresh interpreter
and checks); ``service/api/serving`` turns these into engine jobs and back.
"""

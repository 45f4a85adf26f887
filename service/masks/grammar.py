"""Grammars for structured outputs (xgrammar), with a bounded compile cache."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar as xgr


class GrammarCache:
    """Compiled grammars, least recently used dropped beyond ``size``. Safe to call from several threads."""

    def __init__(self, compiler: xgr.GrammarCompiler, size: int) -> None:
        self._compiler = compiler
        self._size = size
        self._items: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        # Compiles ahead of a job run here, never on the compute thread: a large schema takes seconds (issue 12).
        # xgrammar cannot be interrupted, so one that overruns its time limit finishes here while its request
        # is refused; the size limits at admission bound how long that can be.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="maskserve-grammar")

    def prepare(self, kind: str, source: str) -> Future[xgr.CompiledGrammar]:
        """Compile (or find) a grammar on the grammar thread; the job's own compile then finds it cached."""
        return self._pool.submit(self.get, kind, source)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, kind: str, source: str) -> xgr.CompiledGrammar:
        key = (kind, source)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        compiled = self._compile(kind, source)  # outside the lock: compiling may take a while
        with self._lock:
            self._items[key] = compiled
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return compiled

    def _compile(self, kind: str, source: str) -> xgr.CompiledGrammar:
        if kind == "regex":
            return self._compiler.compile_regex(source)
        if kind == "json_schema":
            # any_whitespace=False: free whitespace lets small models pad forever (vLLM disables it too).
            return self._compiler.compile_json_schema(source, any_whitespace=False)
        if kind == "ebnf":
            return self._compiler.compile_grammar(source)
        raise ValueError(f"unknown grammar kind {kind!r}")


def choice_grammar(options: Sequence[str]) -> str:
    """EBNF accepting exactly one of the options (JSON string literals are valid xgrammar EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(o) for o in options)

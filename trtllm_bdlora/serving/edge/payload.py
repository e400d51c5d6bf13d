"""Request documents checked before anything reads them: JSON nested at most MAX_JSON_DEPTH deep, and every string
valid text (no lone UTF-16 surrogate, which JSON's `\\ud800` escape lets through and nothing downstream can
encode, and no NUL). Each refusal is a 400 naming where in the document the bad value is."""

from __future__ import annotations

import json
from typing import Any

from trtllm_bdlora.errors import InputError, RequestError

MAX_JSON_DEPTH = 64


def text_problem(text: str) -> str | None:
    """Why `text` is not acceptable text, or None. C-speed scans only (str.find, str.encode): a regular expression
    over a 20 MB string holds the interpreter for a second."""
    nul = text.find("\x00")
    if nul >= 0:
        return f"holds a NUL character at character {nul}: not valid text"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"holds a lone surrogate (\\u{ord(text[err.start]):04x}) at character {err.start}: not valid text"
    return None


def check_text(name: str, text: str) -> str:
    problem = text_problem(text)
    if problem is not None:
        raise InputError(name, problem)
    return text


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def check_document(doc: Any, max_depth: int = MAX_JSON_DEPTH, root: str = "") -> Any:
    """`doc` (parsed JSON) when no container is nested deeper than `max_depth` and every string (keys too) is valid
    text; else an InputError naming the path of the first bad value. Iterative: any depth is safe to walk."""
    stack: list[tuple[Any, str, int]] = [(doc, root, 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            check_text(path or "request body", value)
            continue
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        if depth > max_depth:
            raise InputError(path or "request body", f"is nested deeper than {max_depth} levels")
        for key, item in items:
            if isinstance(key, str):
                problem = text_problem(key)
                if problem is not None:
                    raise InputError(f"a key of {path or 'the request body'}", problem)
            if isinstance(item, (str, dict, list)):
                stack.append((item, _join(path, key), depth + 1))
    return doc


def parse_json(body: bytes | str, what: str = "request body") -> Any:
    """The JSON document of a request body, checked (check_document); one-line 400s for everything else."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise RequestError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"{what} is not valid JSON: {err}") from None
    return check_document(doc)

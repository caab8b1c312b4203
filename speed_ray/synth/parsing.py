"""Raw LLM text -> structured values. Pure functions: no Ray, no model.

``extract_json`` follows the SPEED repo's ``utils.py`` repair order: strict-ish ``json.loads``, then
strip code fences and take the first bracketed block, close unterminated brackets, and finally replace
control characters. Failures come back as an error string, never as an exception, so a stage can
record an ``error`` column and the counts show every dropped row.
"""

from __future__ import annotations

import json
import re
from typing import Any

from speed_ray.synth.prompts import FIELDS, STS_TASK

_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)


def extract_json(text: str) -> tuple[Any, str | None]:
    """Return ``(value, None)`` for the first JSON value in ``text``, or ``(None, error)``."""
    unfenced = _FENCE.sub("", text)
    candidates = [text, *_fenced(text), unfenced]
    starts = [i for i in (unfenced.find("{"), unfenced.find("[")) if i >= 0]
    if starts:
        # A value cut off by the token budget: close what is open from its first bracket to the end.
        candidates.append(_close_brackets(unfenced[min(starts) :]))
    block = _first_block(unfenced)
    if block is not None:  # a complete value with chatter around it
        candidates += [block, _close_brackets(block)]
    candidates += [re.sub(r"[\n\r\t]", " ", c) for c in list(candidates)]
    for c in candidates:
        try:
            return json.loads(c.strip(), strict=False), None
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; "[[[[..." recurses too deep
            continue
    return None, f"invalid JSON: {text[:80]!r}"


def _fenced(text: str) -> list[str]:
    """What stands between the first code fence and the last one (a value whose strings hold a fence
    of their own keeps it); none without two fences."""
    fences = list(_FENCE.finditer(text))
    return [text[fences[0].end() : fences[-1].start()]] if len(fences) > 1 else []


def _first_block(text: str) -> str | None:
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return None
    start = min(starts)
    end = max(text.rfind("}"), text.rfind("]"))
    return text[start : end + 1] if end > start else text[start:]


def _close_brackets(text: str) -> str:
    """Append the closing brackets (and a quote) that a truncated JSON value is missing."""
    stack: list[str] = []
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    return text + ('"' if in_str else "") + "".join(reversed(stack))


def parse_task_list(text: str) -> tuple[list[str], str | None]:
    """Brainstorm output -> list of task descriptions (non-empty strings)."""
    value, err = extract_json(text)
    if err:
        return [], err
    if isinstance(value, dict):  # some models wrap the list: {"tasks": [...]}
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if lists else None
    if not isinstance(value, list):
        return [], f"expected a JSON list of tasks, got {type(value).__name__}"
    tasks = [t.strip() for t in value if isinstance(t, str) and _is_sentence(t)]
    if not tasks:
        return [], "no task of at least 3 words in the list"
    return tasks, None


def _is_sentence(text: str) -> bool:
    """A task description needs words: at least 3 alphabetic tokens (drops '  ]', 'S2', '1.')."""
    return sum(w.isalpha() for w in re.findall(r"[^\W\d_]+|\S+", text)) >= 3


def to_triplet(kind: str, task: str, text: str) -> tuple[dict[str, str | None], str | None]:
    """Generated example -> ``{instruction, query, positive, negative}`` (negative None for s2s/p2p)."""
    value, err = extract_json(text)
    if err:
        return {}, err
    return value_to_triplet(kind, task, value)


def value_to_triplet(kind: str, task: str, value: Any) -> tuple[dict[str, str | None], str | None]:
    """A parsed example object (the kind's JSON keys) -> the training row fields, or an error."""
    if not isinstance(value, dict):
        return {}, f"expected a JSON object, got {type(value).__name__}"
    q_key, p_key, n_key = FIELDS[kind]
    row: dict[str, str | None] = {"instruction": STS_TASK if kind == "sts" else task}
    for name, key in (("query", q_key), ("positive", p_key), ("negative", n_key)):
        if key is None:
            row[name] = None
            continue
        v = value.get(key)
        if not isinstance(v, str) or not v.strip():
            return {}, f"missing or empty field {key!r}"
        row[name] = v.strip()
    return row, None


def parse_judgment(text: str, k: int) -> tuple[dict[str, Any], str | None]:
    """Judge output -> ``{best, worst, reason}`` with 0 <= best != worst < k, or an error."""
    value, err = extract_json(text)
    if err:
        return {}, err
    if not isinstance(value, dict):
        return {}, f"expected a JSON object, got {type(value).__name__}"
    best, worst = value.get("best"), value.get("worst")
    for key, v in (("best", best), ("worst", worst)):
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < k:
            return {}, f"field {key!r}: expected an index in 0..{k - 1}, got {v!r}"
        value[key] = v
    if value["best"] == value["worst"]:
        return {}, f"best and worst are the same output ({value['best']})"
    reason = value.get("reason")
    return {"best": value["best"], "worst": value["worst"], "reason": str(reason or "")}, None


def parse_revision(kind: str, task: str, text: str) -> tuple[dict[str, str | None], str | None]:
    """Reviser output ``{reason, revision: {...}}`` -> training row fields plus ``reason``, or an error."""
    value, err = extract_json(text)
    if err:
        return {}, err
    if not isinstance(value, dict) or not isinstance(value.get("revision"), dict):
        return {}, "expected a JSON object with a 'revision' object"
    fields, err = value_to_triplet(kind, task, value["revision"])
    if err:
        return {}, f"revision: {err}"
    return {**fields, "reason": str(value.get("reason") or "")}, None

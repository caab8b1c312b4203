"""SPEED / E5-mistral prompts as pure string building (no Ray, no model).

Brainstorm prompts (SPEED §3.2.1, App. C.1, repo ``prompts_tasks.py``) ask for tasks about one topic;
synthesis prompts (SPEED App. C.1, E5 Tables 8-12, repo ``prompts_synthesis.py``) ask for one JSON
example. Placeholders are drawn from a ``random.Random`` the caller seeds, so a row's prompt is a
function of (run seed, row id) and a rerun rebuilds the same prompt.

Each prompt kind has a JSON schema for structured output: the engine can force valid JSON even from
a 135M model, with every string capped at ``max_chars`` so a completion always closes.
"""

from __future__ import annotations

import random
from typing import Any

SYSTEM = "You are a helpful assistant."
STS_TASK = "Retrieve semantically similar text."

# Prompt kinds: the four SPEED task types, with text matching split into short-short and long-long.
KINDS = ("classification", "sts", "retrieval", "text_matching_short", "text_matching_long")

# Generated JSON keys per kind, in (query, positive, negative) order (SPEED §1.1 table).
FIELDS: dict[str, tuple[str, str, str | None]] = {
    "classification": ("input_text", "label", "misleading_label"),
    "sts": ("S1", "S2", "S3"),
    "retrieval": ("user_query", "positive_document", "hard_negative_document"),
    "text_matching_short": ("input", "positive_document", None),
    "text_matching_long": ("input", "positive_document", None),
}


def kinds_for(task_type: str, rng: random.Random) -> str:
    """Map a configured task type to a prompt kind; text matching is s2s or p2p with equal odds."""
    if task_type == "text_matching":
        return rng.choice(["text_matching_short", "text_matching_long"])
    return task_type


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------------------------
# Brainstorming (one task per topic is kept: SPEED Table 3)

_BRAINSTORM_EXAMPLES = {
    "retrieval": [
        "Provided a scientific claim as query, retrieve documents that help verify or refute the claim.",
        "Search for documents that answers a FAQ-style query on children's nutrition.",
        "Retrieve company's financial reports for a given stock ticker symbol.",
        "Given a book name as query, retrieve reviews, ratings and summaries of that book.",
        "Find the most relevant code snippet given a natural language description of a function.",
    ],
    "classification": [
        "Classify the sentiment of a hotel review as positive, negative or neutral.",
        "Identify the main type of a customer message: question, complaint or feedback.",
        "Classify a forum post as asking for help, sharing experience or offering advice.",
        "Judge the reading difficulty of a short article as easy, medium or hard.",
    ],
    "text_matching_short": [
        "Given a scientific paper title, retrieve the titles of papers that cite it.",
        "Match a word with its definition.",
        "Provided a person's name, find their occupation.",
    ],
    "text_matching_long": [
        "Given a document supporting an argument, find a document arguing the opposite.",
        "Given a business plan, retrieve plans of competing businesses with similar strategies.",
    ],
}

_BRAINSTORM_FRAME = {
    "retrieval": "Brainstorm a list of potentially useful text retrieval tasks for the topic: {topic}.",
    "classification": "Brainstorm a list of potentially useful text classification tasks for the topic: {topic}.",
    "text_matching_short": (
        "Brainstorm a list of text matching tasks for the topic: {topic}, where both the queries and "
        "the ground-truth documents are very short (one or two sentences, even a short phrase)."
    ),
    "text_matching_long": (
        "Brainstorm a list of text matching tasks for the topic: {topic}, where the queries are long "
        "documents."
    ),
}


def brainstorm_prompt(kind: str, topic: str, rng: random.Random) -> list[dict[str, str]]:
    """The brainstorm chat for one (kind, topic); examples shuffled with ``rng`` as in the repo."""
    examples = list(_BRAINSTORM_EXAMPLES[kind])
    rng.shuffle(examples)
    lines = [_BRAINSTORM_FRAME[kind].format(topic=topic), "", "Here are a few examples for your reference:"]
    lines += [f"- {e}" for e in examples]
    lines += ["", "Brainstorming guidelines:"]
    if kind == "retrieval":
        lines.append("- Specify what the query is, and what the desired documents are.")
        lines.append(
            "- Each retrieval task should cover a wide range of queries, and should not be too specific."
        )
    elif kind == "classification":
        lines.append("- Cover a diverse range of domains and task types.")
        lines.append("- Avoid tasks similar to sentiment, topic, spam, urgency or language classification.")
    lines += [
        "",
        "Your output must always be a JSON list of strings only, with about 5 elements, and each element "
        "corresponds to a distinct task in one sentence. Do not explain yourself or output anything else. "
        "Be creative!",
    ]
    return chat("\n".join(lines))


def brainstorm_schema(max_chars: int) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {"type": "string", "minLength": 8, "maxLength": max_chars},
        "minItems": 1,
        "maxItems": 5,
    }


# ----------------------------------------------------------------------------------------------
# Example synthesis


def _choice(rng: random.Random, values: list[Any], weights: list[float] | None = None) -> Any:
    return rng.choices(values, weights=weights, k=1)[0]


def synthesis_prompt(kind: str, task: str, rng: random.Random) -> list[dict[str, str]]:
    """The chat that asks for one example of ``kind`` for ``task`` (STS: ``task`` is the topic)."""
    build = {
        "retrieval": _retrieval,
        "classification": _classification,
        "sts": _sts,
        "text_matching_short": _matching,
        "text_matching_long": _matching,
    }[kind]
    return chat(build(kind, task, rng))


def _finish(head: str, guidelines: list[str], rng: random.Random, tail: str) -> str:
    rng.shuffle(guidelines)
    body = "\n".join(f"  - {g}" for g in guidelines)
    return f"{head}\n\nPlease adhere to the following guidelines:\n{body}\n\n{tail}"


_TAIL = "Your output must always be a JSON object only, do not explain yourself or output anything else. Be creative!"


def _retrieval(kind: str, task: str, rng: random.Random) -> str:
    query_type = _choice(rng, ["extremely long-tail", "long-tail", "common"], [0.4, 0.5, 0.1])
    query_length = _choice(rng, ["less than 5 words", "5 to 15 words", "at least 10 words"], [0.4, 0.4, 0.2])
    clarity = _choice(rng, ["clear", "understandable with some effort", "ambiguous"], [0.6, 0.2, 0.2])
    num_words = _choice(rng, [50, 100, 200, 300, 400, 500])
    head = (
        f"You have been assigned a retrieval task: {task}\n"
        "Your mission is to write one text retrieval example for this task in JSON format. The JSON object "
        'must contain the following keys:\n  - "user_query": a string, a random user search query specified '
        'by the retrieval task.\n  - "positive_document": a string, a relevant document for the user query.\n'
        '  - "hard_negative_document": a string, a hard negative document that only appears relevant to the query.'
    )
    guidelines = [
        f'The "user_query" should be {query_type}, {query_length}, {clarity}, and diverse in topic.',
        "All documents must be created independent of the query. Avoid copying the query verbatim.",
        f"All documents should be at least {num_words} words long.",
        'The "hard_negative_document" contains some useful information, but it should be less useful or '
        'comprehensive compared to the "positive_document".',
        "Both the query and documents should be in English.",
        "Do not provide any explanation in any document on why it is relevant or not relevant to the query.",
    ]
    if rng.random() < 0.5:
        difficulty = _choice(rng, ["high school", "college", "PhD"])
        guidelines.append(f"Both the query and documents require {difficulty} level education to understand.")
    return _finish(head, guidelines, rng, _TAIL)


def _classification(kind: str, task: str, rng: random.Random) -> str:
    num_words = _choice(
        rng,
        ["less than 10", "at least 10", "at least 50", "at least 100", "at least 200"],
        [0.1, 0.3, 0.2, 0.2, 0.2],
    )
    head = (
        f"You have been assigned a text classification task: {task}\n"
        "Your mission is to write one text classification example for this task in JSON format. The JSON "
        'object must contain the following keys:\n  - "input_text": a string, the input text specified by '
        'the classification task.\n  - "label": a string, the correct label of the input text.\n'
        '  - "misleading_label": a string, an incorrect label that is related to the task.'
    )
    guidelines = [
        f'The "input_text" should be {num_words} words and diverse in expression.',
        'The "misleading_label" must be a valid label for the given task, but not as appropriate as the "label" '
        'for the "input_text".',
        "The values for all fields should be in English.",
        'Avoid including the values of the "label" and "misleading_label" fields in the "input_text", that '
        "would make the task too easy.",
    ]
    if rng.random() < 0.5:
        clarity = _choice(rng, ["clear", "understandable with some effort", "ambiguous"], [0.6, 0.2, 0.2])
        difficulty = _choice(rng, ["high school", "college", "PhD"])
        guidelines.append(
            f'The "input_text" is {clarity} and requires {difficulty} level education to comprehend.'
        )
    return _finish(head, guidelines, rng, _TAIL)


def _sts(kind: str, topic: str, rng: random.Random) -> str:
    unit = _choice(rng, ["sentence", "phrase", "passage"], [0.9, 0.05, 0.05])
    high = _choice(rng, [4, 4.5, 5])
    low = _choice(rng, [2.5, 3, 3.5])
    head = (
        f"Write a {unit} triple with varying semantic similarity scores in JSON format for the topic: {topic}. "
        f"The semantic similarity score ranges from 1 to 5, with 1 denotes least similar and 5 denotes most "
        f"similar.\n"
    )
    guidelines = [
        'The keys in JSON are "S1", "S2", and "S3", the values are all strings in English, do not add any '
        "other keys.",
        "There should be some word overlaps between all three strings.",
        f"The similarity score between S2 and S1 should be {high}.",
        f"The similarity score between S3 and S1 should be {low}.",
    ]
    if rng.random() < 0.5:
        difficulty = _choice(rng, ["elementary school", "high school", "college"])
        guidelines.append(f"The strings should be {difficulty} level, diverse in topic and length.")
    return _finish(
        head,
        guidelines,
        rng,
        "Your output must always be a JSON object only with three keys "
        '"S1", "S2" and "S3", do not explain yourself or output anything else. Be creative!',
    )


def _matching(kind: str, task: str, rng: random.Random) -> str:
    short = kind == "text_matching_short"
    length = "very short (a sentence or a phrase)" if short else "long documents (at least 300 words)"
    head = (
        f"You have been assigned a text matching task: {task}\n"
        "Your mission is to write one example for this task in JSON format. The JSON object must contain the "
        'following keys:\n  - "input": a string, a random input specified by the task.\n'
        '  - "positive_document": a string, a relevant document for the "input" according to the task.'
    )
    guidelines = [
        "The values of all fields should be in English.",
        f'Both the "input" and "positive_document" should be {length}.',
        'The "input" and "positive_document" should be independent of each other and avoid substantial '
        "word overlaps.",
    ]
    return _finish(head, guidelines, rng, _TAIL)


def synthesis_schema(kind: str, max_chars: int) -> dict[str, Any]:
    keys = [k for k in FIELDS[kind] if k is not None]
    string = {"type": "string", "minLength": 1, "maxLength": max_chars}
    return {
        "type": "object",
        "properties": {k: string for k in keys},
        "required": keys,
        "additionalProperties": False,
    }


# ----------------------------------------------------------------------------------------------
# Judge (SPEED §3.2.3, App. C.2; repo ``get_create_dpo_data_prompt``) and reviser (§3.2.4)


def judge_prompt(data_prompt: str, outputs: list[str]) -> list[dict[str, str]]:
    """Ask which of ``outputs`` fits ``data_prompt`` best and which worst (indices from 0)."""
    listing = "\n".join(f"[{i}] {o}" for i, o in enumerate(outputs))
    return chat(
        "You are given a data synthesis prompt and a list of outputs generated for it.\n\n"
        f"### Prompt\n{data_prompt}\n\n### Outputs\n{listing}\n\n"
        "Decide which output fits the prompt best and which fits it worst: judge the relevance to the "
        "task, the completeness of the required JSON keys, and how well the guidelines are followed. "
        'Your output must be a JSON object with the keys "reason" (a string, why), "best" (the index of '
        'the best output, indices start from 0) and "worst" (the index of the worst output). Do not '
        "output anything else."
    )


def judge_schema(k: int, max_chars: int) -> dict[str, Any]:
    index = {"type": "integer", "enum": list(range(k))}
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "minLength": 1, "maxLength": max_chars},
            "best": index,
            "worst": index,
        },
        "required": ["reason", "best", "worst"],
        "additionalProperties": False,
    }


def revise_prompt(data_prompt: str, example: str) -> list[dict[str, str]]:
    """Ask for a critique of one example against its prompt, then a revised example with the same keys."""
    return chat(
        "You are given a data synthesis prompt and one example generated for it.\n\n"
        f"### Prompt\n{data_prompt}\n\n### Example\n{example}\n\n"
        "Evaluate the example on three criteria: (1) relevance to the task in the prompt; (2) "
        "completeness against the elements the prompt requires; (3) factual accuracy and adherence to "
        "the guidelines. Explain briefly for each criterion, then write a revised version of the example "
        'that fixes every problem you found. Your output must be a JSON object with the keys "reason" '
        '(a string, your explanation) and "revision" (a JSON object with exactly the keys of the '
        "example). Do not output anything else."
    )


def revise_schema(kind: str, max_chars: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "minLength": 1, "maxLength": max_chars},
            "revision": synthesis_schema(kind, max_chars),
        },
        "required": ["reason", "revision"],
        "additionalProperties": False,
    }

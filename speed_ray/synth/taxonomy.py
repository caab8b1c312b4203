"""Topic taxonomies for brainstorming: the built-in default, a file reader, and SPEED's truncation.

SPEED (§3.2.1, App. D.1) conditions task brainstorming on topics sampled from the Open Directory
Project (ODP/DMOZ) category tree. ODP ships in no package registry, so the default taxonomy,
``speed_ray/data/topics.txt``, is an ODP-shaped stand-in derived from WordNet 3.0's noun hierarchy
(Princeton University, WordNet 3.0 license, a permissive BSD-style license whose notice is in
``speed_ray/data/TOPICS_LICENSE``): ODP's top-level names (Arts, Business, Computers, ...) over
WordNet hyponym chains, e.g. ``Arts/Musical_Instrument/Stringed_Instrument/Guitar``.
``scripts/build_topics.py`` rebuilds it.

A taxonomy file holds one ``A/B/C`` path per line; blank lines and lines starting with ``#`` are
skipped. SPEED truncates paths deeper than 4 levels to their first two and last two levels:
``Arts/Movies/Titles/3/36_Hours_-_1964/Cast_and_Crew`` -> ``Arts/Movies/36_Hours_-_1964/Cast_and_Crew``.
"""

from __future__ import annotations

from pathlib import Path

MAX_TOPIC_CHARS = 200


def default_topics_path() -> Path:
    """Path of the built-in WordNet-derived taxonomy shipped as package data."""
    return Path(__file__).parents[1] / "data" / "topics.txt"


def read_taxonomy(path: str | Path) -> list[str]:
    """Read one ``A/B/C`` topic path per line, in file order.

    Args:
        path: a text file; blank lines and lines starting with ``#`` are skipped.

    Returns:
        The topic paths, stripped of surrounding whitespace.

    Raises:
        ValueError: a line is not a valid path (the message names the file and 1-based line), or
            the file holds no topics.
    """
    topics = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        topic = line.strip()
        if not topic or topic.startswith("#"):
            continue
        problem = _path_problem(topic)
        if problem:
            raise ValueError(
                f"{path}:{number}: expected a topic path like 'Arts/Movies/Westerns' "
                f"(non-empty '/'-separated segments, at most {MAX_TOPIC_CHARS} chars), "
                f"got {topic[:80]!r}: {problem}"
            )
        topics.append(topic)
    if not topics:
        raise ValueError(f"{path}: no topics (expected one 'A/B/C' path per line; '#' starts a comment)")
    return topics


def _path_problem(topic: str) -> str | None:
    """What is wrong with one stripped topic path, or None if it is valid."""
    if len(topic) > MAX_TOPIC_CHARS:
        return f"{len(topic)} chars"
    segments = topic.split("/")
    if any(not s for s in segments):
        return "empty segment"
    if any(s != s.strip() for s in segments):
        return "a segment starts or ends with a space"
    return None


def truncate(path: str) -> str:
    """Keep the first two and last two levels of a deep ODP path (SPEED App. D.1)."""
    parts = [p for p in path.strip().strip("/").split("/") if p]
    if len(parts) > 4:
        parts = parts[:2] + parts[-2:]
    return "/".join(parts)

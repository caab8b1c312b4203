"""Checks every engine must pass, called from each engine's own test module."""

from __future__ import annotations

from speed_ray.engines import Request, Sampling


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def seeded_rows_do_not_depend_on_their_batch(engine) -> list:
    """A row sampled alone and in a batch with another row gives the same texts; returns them."""
    a = Request(chat("hello one"), seed=11)
    b = Request(chat("hello two"), seed=22)
    sampling = Sampling(temperature=1.0, max_tokens=12, n=2)
    alone = engine.generate([a], sampling)[0]
    together = engine.generate([b, a], sampling)[1]
    assert [c.text for c in alone] == [c.text for c in together]
    assert len(alone) == 2
    return alone

"""The ``eval.*``, ``report`` and ``experiment.*`` sections: kNN and retrieval tasks through mteb,
per-layer scores, the run report and experiments over config variants."""

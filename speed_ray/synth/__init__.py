"""The ``synth.*`` section: SPEED's data synthesis. Taxonomy, prompts, parsing, the pure request and
selection functions, MinHash dedup, the Ray Data generation stage, and the driver ``run(cfg)``."""

"""The ``embed.*`` section: contrastive training of the embedding model. Losses, GradCache, crop pairs,
the model wrapper, the Ray Train loop and the driver ``run(cfg)``."""

"""The ``align.*`` section: SPEED's alignment of the junior generator (SFT), senior generator (DPO
against the junior) and revisor (SFT). The TRL glue and its Ray Train loop, and the driver ``run(cfg)``."""

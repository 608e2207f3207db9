"""The trainer: ``server`` (its HTTP API), ``runs`` (runs and their kinds), ``cluster`` (replicas and
discovery) and ``client`` (what your own training code imports: ``publish``, the callback, ``TrainerClient``)."""

"""srum's top layer: the composition root (:mod:`srum.registry`), the job entrypoint (:mod:`srum.main`),
the ``srum`` command line (:mod:`srum.cli`) and the in-process reference loop (:mod:`srum.local`)."""

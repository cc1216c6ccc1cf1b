"""The shared vocabulary of srum, the bottom layer every other package may import: the config schema
(:mod:`core.config`) and its loading (:mod:`core.config_io`), the records that cross actor boundaries and
the drop reasons (:mod:`core.records`), metric names and their recorder (:mod:`core.metrics`), and
prompt records with their sources (:mod:`core.prompt_sets`). Nothing here imports another srum package.
"""

"""The bottom layer: the typed config schema (``schema``), the one CLI convention (``cli``) and
the IO helpers every package needs (``io``). It imports nothing else of this project; the YAML
files beside it are the configs of each scale."""

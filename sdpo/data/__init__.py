"""Dataset preparation for the paper's settings: ``python -m sdpo.data prepare NAME --out DIR``.

The formats belong to the environments (environments/prepare/, reached through
``environments.loaders``); this package is only the command line."""

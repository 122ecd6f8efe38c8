"""Preparing the paper's datasets as the SDPO authors did (lasgroup/SDPO ``data/``): the same
filters, seeded splits, prompts and answer keys, written as JSONL files that the built-in
environments read. Run through ``python -m sdpo.data prepare NAME --out DIR``; the registry of
names is ``environments.loaders.PREPARERS``. Nothing here imports torch or Ray."""

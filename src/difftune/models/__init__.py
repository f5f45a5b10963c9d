"""The model families: loading, conditioning and pipelines. SDXL (`sdxl`) from a diffusers folder, a Hub id or
one single file (`single_file`, with the original SGM names in `sgm_layout`); the Wuerstchen prior, v2
(`wuerstchen`) and Stable Cascade (`cascade`), and which of the two a folder holds (`priors`).

May import: difftune.cli, difftune.storage, difftune.data.
"""

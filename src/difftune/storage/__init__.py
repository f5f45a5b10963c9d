"""Files on disk and on the Hub: model locations (`hub`), checkpoint folders (`checkpoints`), manifests and
checksums and a full disk (`integrity`), one run per folder (`runlock`), and caches of per-sample tensors
(`shards`).

May import: difftune.cli.
"""

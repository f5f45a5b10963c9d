"""difftune: fine-tune SDXL and Wuerstchen with parameter-efficient adapters.

The library is a stack of packages by concern; each imports only from those listed before it (tests/test_layers.py
holds the order and checks it):

- cli: the command line's basics (one-line user errors, the argument parser)
- storage: files on disk and on the Hub (checkpoints, manifests and checksums, locks, tensor shards)
- data: captioned images, how users keep them, and their cached encodings
- models: the model families (SDXL and its single files, Wuerstchen v2, Stable Cascade)
- formats: other programs' files (kohya / LyCORIS, ComfyUI, a merged single-file checkpoint, the model card)
- adapters: LoKr and LoRA on a model (flags, peft configs, faster forwards, a start from existing weights, EMA)
- generate: images from a base model and adapters (pipelines, prompt files, validation, class images)
- train: the training run (flags, setup, resume, the loop, optimizer updates, objectives, evaluation)
"""

__version__ = "0.1.0"

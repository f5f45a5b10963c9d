"""Images from a base model and adapters: pipelines with a trained checkpoint (`inference`), prompt files in
kohya's sample-prompt syntax (`prompts`), validation images during training (`validation`), and the missing
class images of DreamBooth (`class_images`).

May import: difftune.cli, difftune.storage, difftune.data, difftune.models, difftune.formats, difftune.adapters.
"""

"""Parts of scripts/make_tiny_assets.py: the CLIP vocabulary and tokenizers, the single-file (SGM) SDXL
conversion, and the Stable Cascade repos (imported by the script, which runs with scripts/ on sys.path)."""

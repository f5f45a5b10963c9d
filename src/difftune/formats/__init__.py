"""Files for other programs: the kohya / LyCORIS LoKr file (`kohya`) that ComfyUI and AUTOMATIC1111 load,
Stable Cascade LoRAs for ComfyUI (`comfyui`), one merged single-file checkpoint (`merged_checkpoint`), and the
model card written beside a run (`modelcard`).

May import: difftune.cli, difftune.storage, difftune.data, difftune.models.
"""

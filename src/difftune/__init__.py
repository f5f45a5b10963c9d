"""difftune: fine-tune SDXL and Wuerstchen with parameter-efficient adapters."""

__version__ = "0.1.0"

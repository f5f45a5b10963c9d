"""Which generation of the Wuerstchen prior a model folder or a finished run holds: Wuerstchen v2
(difftune.models.wuerstchen) or Stable Cascade (difftune.models.cascade), by the class the prior's config names."""

from __future__ import annotations

import json

from difftune.cli.errors import UserError
from difftune.models.cascade import CASCADE
from difftune.models.wuerstchen import PRIOR_PIPELINE, V2, PriorFamily
from difftune.storage.hub import fetch_file

FAMILIES = (V2, CASCADE)


def prior_family(path: str, subfolder: str = "prior", revision: str | None = None) -> PriorFamily:
    """The generation of the prior in `path`/`subfolder`, by the class its config names."""
    flag = "--pretrained_prior_model_name_or_path"
    families = {family.prior_class: family for family in FAMILIES}
    pipeline = json.loads(fetch_file(path, "model_index.json", revision, flag).read_text()).get("_class_name")
    if pipeline not in {family.prior_pipeline for family in families.values()}:
        raise UserError(
            f"{flag} {path} is a {pipeline} pipeline, not a {PRIOR_PIPELINE} (Wuerstchen v2) or a "
            f"{CASCADE.prior_pipeline} (Stable Cascade): pass a prior repo such as warp-ai/wuerstchen-prior "
            "or stabilityai/stable-cascade-prior"
        )
    found = json.loads(fetch_file(path, f"{subfolder}/config.json", revision, flag).read_text()).get("_class_name")
    if found not in families:
        raise UserError(
            f"{flag} {path}: {subfolder}/ holds a {found}, neither a Wuerstchen v2 prior (WuerstchenPrior) nor a "
            "Stable Cascade prior (StableCascadeUNet): pass a Wuerstchen or Stable Cascade prior repo"
        )
    return families[found]


def resolve_family(args) -> PriorFamily:
    """The run's prior generation; fills in the decoder and image encoder defaults that depend on it, and
    records the prior's class in args (args.json: export and inference read it)."""
    family = prior_family(args.pretrained_prior_model_name_or_path, args.prior_subfolder, args.revision)
    if args.pretrained_decoder_model_name_or_path is None:
        args.pretrained_decoder_model_name_or_path = family.default_decoder
    if args.image_encoder_path is None:
        args.image_encoder_path = family.default_image_encoder
    args.prior_class = family.prior_class
    return family


def family_of_run(run_args: dict) -> PriorFamily:
    """The generation a checkpoint's args.json was trained on (runs before Stable Cascade: v2)."""
    return CASCADE if run_args.get("prior_class") == CASCADE.prior_class else V2

"""Export a run's backbone for timm and the Hugging Face Hub.

    ifc-export --checkpoint out/cifar10 --out exported/cifar10

writes the folder layout timm's Hub tooling writes (``timm.models.save_for_hf``): ``config.json`` (the
architecture, ``num_features``, and a ``pretrained_cfg`` with the run's input size and the mean/std its
images were normalised with) and ``model.safetensors`` (the fp32 master weights, no projection head).
Load it with ``timm.create_model("local-dir:<folder>", pretrained=True, num_classes=0)``, or with
``ifc_ds.model.load_exported(folder)``, which also rebuilds the small-image stem (``model.small_images``).
Upload it as it is with ``huggingface_hub.upload_folder(repo_id=..., folder_path=<folder>)``.
``--out x.safetensors`` writes the weights alone instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ifc_ds.augment import eval_crop_pct
from ifc_ds.checkpoint import read_checkpoint
from ifc_ds.config import AugmentConfig, config_from_dict
from ifc_ds.engine.state import fp32_encoder_state
from ifc_ds.lifecycle import bad_input_exits
from ifc_ds.model import EXPORT_STEM_KEY, InstanceEncoder, data_config


def load_run_encoder(checkpoint: str, image_size: int | None = None):
    """(encoder with the fp32 master weights, the run's Config, the checkpoint folder) of a run's
    output_dir (its newest checkpoint) or of one checkpoint folder; ``image_size`` overrides the run's
    (ViTs fix their patch grid from it)."""
    ckpt, meta = read_checkpoint(checkpoint)
    run_cfg = config_from_dict(meta["config"])
    encoder = InstanceEncoder(run_cfg.model, image_size or run_cfg.data.image_size)
    encoder.load_state_dict(fp32_encoder_state(ckpt, encoder))
    return encoder, run_cfg, ckpt


_SOURCE_KEYS = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "license", "paper_ids", "paper_name",
                "origin_url", "notes")


def _follow_umask(path: Path) -> None:
    """safetensors writes its file with mode 0600 (a temporary file renamed); give it the mode any new
    file gets here, as config.json has: others can read what is shared."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def export_backbone(checkpoint: str, out: str) -> Path:
    """Writes the backbone of ``checkpoint`` to the folder ``out`` (or the file ``out`` if it ends in
    .safetensors); returns the path written."""
    encoder, run_cfg, _ = load_run_encoder(checkpoint)
    backbone = encoder.backbone.float().eval()
    out_path = Path(out)
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(out_path))
        _follow_umask(out_path)
        return out_path
    from timm.models import save_for_hf

    mean, std = data_config(run_cfg.model.name)
    size = run_cfg.data.image_size
    # timm's defaults describe the weights timm would download for this architecture (their tag, paper,
    # licence): not these, which the run trained from scratch
    backbone.pretrained_cfg = {k: v for k, v in backbone.pretrained_cfg.items() if k not in _SOURCE_KEYS}
    model_config = {EXPORT_STEM_KEY: True} if run_cfg.model.small_images else {}
    if run_cfg.model.kwargs:
        model_config["model_args"] = dict(run_cfg.model.kwargs)
    save_for_hf(backbone, str(out_path), model_config=model_config, safe_serialization=True,
                data_config={"input_size": (3, size, size), "mean": mean, "std": std,
                             "crop_pct": eval_crop_pct(AugmentConfig(), size)})
    _follow_umask(out_path / "model.safetensors")
    return out_path


@bad_input_exits
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's output_dir or one checkpoint folder")
    parser.add_argument("--out", required=True, help="a folder (timm / HF Hub layout) or a .safetensors file")
    args = parser.parse_args(argv)
    print(f"wrote {export_backbone(args.checkpoint, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

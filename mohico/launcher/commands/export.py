"""`mohico export CKPT OUT.pt [--format torchvision|mohico]`: a checkpoint's backbone as a plain state_dict."""
from __future__ import annotations

HELP = "export a checkpoint's backbone weights (torchvision state_dict or mohico backbone file)"
DESCRIPTION = (
    "Write the backbone of CKPT to OUT.pt. --format torchvision (default) writes a plain state_dict "
    "that torchvision.models.video.<name>() (r3d_18, r2plus1d_18, s3d) loads with strict=True; its "
    "classifier (fc / classifier.1) is zeros, replace it for your task. --format mohico writes a "
    "backbone file (name, options, weights) for any mohico backbone. CKPT is read with "
    "torch.load(weights_only=True); OUT is written atomically."
)


def add_arguments(p):
    p.add_argument("ckpt", metavar="CKPT", help="a backbone file written by mohico, a run directory, its "
                   "checkpoints/ folder, one DeepSpeed checkpoint folder, or DeepSpeed zero_to_fp32's "
                   "output (pytorch_model.bin / *.safetensors, or its folder)")
    p.add_argument("out", metavar="OUT.pt", help="output file")
    p.add_argument("--format", dest="fmt", choices=("torchvision", "mohico"), default="torchvision",
                   help="torchvision: state_dict for torchvision's video model (default); "
                        "mohico: backbone file with name and options")
    p.add_argument("--config", default=None, help="the run's config.yaml, to name the backbone of a zero_to_fp32 "
                   "output (default: a config.yaml or mohico_meta.json beside it or in a parent folder)")


def run(args) -> int:
    from mohico.models.export import export_checkpoint

    path = export_checkpoint(args.ckpt, args.out, args.fmt, config=args.config)
    print(f"wrote {path} ({args.fmt})")
    return 0

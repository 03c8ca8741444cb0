"""Explanation maps (Grad-CAM, Grad-CAM++, LRP) of a trained model, with localisation metrics against NIH boxes.

    python scripts/explain.py --model_dir models --input_dir ../shared/data/nih/images_full \\
        --tabular_csv ../shared/data/nih/labels.csv --boxes_csv ../shared/data/nih/bbox.csv --explain_dir runs/explain

The same workflow as ``configs/explain.yaml`` (`medfusionnet.explain.workflow.explain_images`); prints the
localisation table (pointing game, adapted Rand error, IoBB, ...) for each method against the random-map baseline
and the model-randomisation check.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from medfusionnet.explain.saliency import METHODS, NIH_BOX_FRAME
from medfusionnet.explain.workflow import explain_images
from medfusionnet.files import outputs_line


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="a training run's output_dir (model.pt, run_settings)")
    parser.add_argument("--input_dir", required=True, help="a folder searched recursively, or one image file")
    parser.add_argument("--explain_dir", required=True, help="where maps, overlays and tables are written")
    parser.add_argument("--tabular_csv", help="NIH-format CSV with age, sex, view and follow-up per image")
    parser.add_argument("--findings", nargs="+", help="default: findings above threshold, plus boxed ones")
    parser.add_argument("--methods", nargs="+", default=["gradcam", "lrp"], choices=METHODS)
    parser.add_argument("--cam_layers", nargs="+", default=["cnn"], help="Grad-CAM targets: cnn, c2t, t2c")
    parser.add_argument("--boxes_csv", help="NIH BBox_List_2017.csv format")
    parser.add_argument("--box_frame", type=int, default=NIH_BOX_FRAME)
    parser.add_argument("--map_threshold", type=float, default=0.5)
    parser.add_argument("--random_maps", type=int, default=20)
    parser.add_argument("--no_sanity_check", action="store_true", help="skip the model-randomisation check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = explain_images(
        args.model_dir,
        args.input_dir,
        args.explain_dir,
        args.tabular_csv,
        args.findings,
        args.methods,
        args.cam_layers,
        args.boxes_csv,
        args.box_frame,
        args.map_threshold,
        args.random_maps,
        sanity_check=not args.no_sanity_check,
        device=args.device,
        seed=args.seed,
    )
    keys = (
        "pointing_hit",
        "adapted_rand_error",
        "rand_precision",
        "rand_recall",
        "iou",
        "iobb",
        "false_splits",
        "false_merges",
    )
    if "localisation" in summary:
        print(f"{'map':<22}{'n':>5}" + "".join(f"{k[:14]:>15}" for k in keys))
        for name, scores in summary["localisation"].items():
            print(f"{name:<22}{scores['maps']:>5}" + "".join(f"{scores[k]:>15.3f}" for k in keys))
    if "randomisation_check" in summary:
        print("Spearman correlation with maps of a re-initialised network (lower = more weight-dependent):")
        print(json.dumps(summary["randomisation_check"], indent=2))
    print(f"{summary['maps']} map(s), {summary['constant_maps']} constant, {len(summary['skipped'])} image(s) skipped")
    print(outputs_line(args.explain_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

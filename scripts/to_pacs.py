"""Run a study stored in a PACS and store the results back into it, over DICOMweb.

    python scripts/to_pacs.py --model_dir models --dicomweb http://127.0.0.1:8042/dicom-web --study <StudyInstanceUID>

Each CR / DX X-ray of the study is retrieved (WADO-RS) and run; a DICOM Structured Report (every finding with its
probability, threshold and decision; the tier; the tabular level and combined tier with a risk model; the model's
name and version; a reference to the X-ray) and, when a finding is positive, a DICOM Segmentation of the positive
findings' Grad-CAM regions are stored back into the study (STOW-RS). The study's ``decisions.json`` and
``decisions.html`` go to ``--output_dir`` (default ``<model_dir>/pacs/<study>``; an earlier folder is kept and a
numbered one made). Prints what was stored as JSON; exits 1 with the reason when the study cannot be run.
``--model_dir`` is a training run's output_dir or a packaged bundle's ``models/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from medfusionnet.files import fresh_folder


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="a training run's output_dir or a bundle's models/")
    parser.add_argument("--dicomweb", required=True, help="the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    parser.add_argument("--study", required=True, help="StudyInstanceUID")
    parser.add_argument("--output_dir", help="for decisions.json / decisions.html (default <model_dir>/pacs/<study>)")
    parser.add_argument("--modalities", nargs="+", default=["CR", "DX"], help="the series run (default CR DX)")
    parser.add_argument("--cam_threshold", type=float, default=0.5, help="a region: map >= this share of its maximum")
    parser.add_argument("--no_store", action="store_true", help="write the local report only; store nothing")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not 0.0 < args.cam_threshold <= 1.0:
        parser.error(f"--cam_threshold must be in (0, 1], got {args.cam_threshold}")
    import requests
    from dicomweb_client.api import DICOMwebClient

    from medfusionnet.report.pacs import report_study
    from medfusionnet.serving import XrayPredictor

    predictor = XrayPredictor(args.model_dir, args.device)
    client = DICOMwebClient(url=args.dicomweb.rstrip("/"))
    output_dir = fresh_folder(args.output_dir or os.path.join(args.model_dir, "pacs", args.study), overwrite=False)
    try:
        summary = report_study(
            predictor, client, args.study, output_dir, args.cam_threshold, not args.no_store, tuple(args.modalities)
        )
    except (ValueError, requests.RequestException) as err:  # an unknown study, a refused store, no server
        print(f"to_pacs: {args.dicomweb}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

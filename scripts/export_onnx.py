"""Export a training run as ONNX (``torch.onnx.export`` through ``torch.export``, no TorchScript).

    python scripts/export_onnx.py --model_dir models [--output models/model.onnx]
    python scripts/export_check.py --model_dir models --input_dir ../shared/data/nih/images_full \\
        --tabular_csv ../shared/data/nih/labels.csv   # parity with eager PyTorch on real images, both exports

The graph takes ``image`` (N, C, H, W) and ``tabular`` (N, F, the run's tabular encoding) with a dynamic batch size
and returns the 14 logits; ``metadata.json``, the run's ``run_settings.json`` and the label names are embedded in
the file's metadata. Needs ``pip install -e ".[export]"`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import os
import sys

from medfusionnet.engine.export import export_run_onnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="a training run's output_dir (model.pt, run_settings)")
    parser.add_argument("--output", help="the ONNX file (default: <model_dir>/model.onnx)")
    parser.add_argument("--meta_file", default=os.path.join(REPO, "metadata.json"), help="embedded metadata.json")
    args = parser.parse_args(argv)
    path = export_run_onnx(args.model_dir, args.output, args.meta_file)
    print(f"wrote {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

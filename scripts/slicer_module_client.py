"""Drive a MONAI Label server the way 3D Slicer's MONAI Label module does, and report what a Slicer user would see.

    python scripts/slicer_module_client.py --server http://127.0.0.1:8000 [--samples 2] [--params '{"age": "58"}']

Runs where ``monailabel`` is installed (its ``MONAILabelClient`` is the client the module carries). The steps are
the module's own: ``GET /info`` on connect; the segmentation selector lists the models whose ``type`` is
``segmentation`` (``updateSelector(..., ["segmentation"], ...)``), the first one selected; "Next Sample" asks
``/activelearning/random`` for an image; "Run" posts ``/infer/<model>?image=<id>`` with the model's config as
params; the answer's label file is read with SimpleITK (as ``updateSegmentationMask`` does) and the label values are
named from the params' ``label_names`` (else the model's ``labels``) sorted by value. Prints, per sample, the
segments Slicer would create (name and pixel count), the label map's size, spacing and direction, and the params.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def segment_names(params: dict, model_info: dict) -> list[str]:
    """The module's naming: ``label_names`` of the result, else the model's labels; a dict sorted by value."""
    labels = params.get("label_names") if params and params.get("label_names") else model_info.get("labels")
    if labels and isinstance(labels, dict):
        labels = [k for k, _ in sorted(labels.items(), key=lambda item: item[1])]
    return [label for label in labels if label != "background"]


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--samples", type=int, default=1, help="how many times to press Next Sample and Run")
    parser.add_argument("--images", nargs="+", help="image ids to run instead of Next Sample's random ones")
    parser.add_argument("--params", default="{}", help="JSON merged into the model config (e.g. tabular fields)")
    args = parser.parse_args(argv)
    import numpy as np
    import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user, Slicer included, knows)
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(args.server, tmpdir=tempfile.mkdtemp(prefix="slicer-client-"))
    info = client.info()
    models = info.get("models", {})
    selector = [name for name, model in models.items() if model["type"] in ["segmentation"]]
    if not selector:
        print(json.dumps({"error": "no segmentation model: the Slicer module would show an empty selector"}))
        return 1
    model = selector[0]
    out = {"server": info.get("name"), "segmentation_models": selector, "model": model, "samples": []}
    for i in range(len(args.images) if args.images else args.samples):
        sample = {"id": args.images[i]} if args.images else client.next_sample("random", {})
        params = {**models[model].get("config", {}), **json.loads(args.params)}
        result_file, result = client.infer(model, sample["id"], params)
        image = sitk.ReadImage(result_file)
        array = sitk.GetArrayFromImage(image)
        names = segment_names(result, models[model])
        segments = {names[v - 1]: int((array == v).sum()) for v in sorted(set(np.unique(array).tolist()) - {0})}
        out["samples"].append(
            {
                "id": sample["id"],
                "label_file": result_file,
                "size": list(image.GetSize()),
                "spacing": list(image.GetSpacing()),
                "direction": list(image.GetDirection()),
                "origin": list(image.GetOrigin()),
                "segments": segments,
                "params": result,
            }
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ONNX export of a trained run, for runtimes that do not read TorchScript (onnxruntime, TensorRT, Triton).

``torch.onnx.export`` with ``dynamo=True`` traces the network through ``torch.export``, so it does not depend on
``torch.jit.script``. The graph takes ``image`` (N, C, H, W) and ``tabular`` (N, F) with a dynamic batch size and
returns ``logits`` (N, 14); the run's ``metadata.json``, ``run_settings.json`` and the label names travel in the
file's ``metadata_props``. Needs the ``export`` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings

import torch

from ..constants import LABELS
from ..files import write_bytes_atomic
from .run_settings import saved_setting

ONNX_INPUTS = ("image", "tabular")
ONNX_OPSET = 18
ONNX_EMBEDDED = ("labels", "metadata.json", "run_settings.json")  # what export_run_onnx puts in the metadata
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


def export_onnx(network: torch.nn.Module, path: str, input_shape: tuple, num_tabular: int, embedded: dict) -> str:
    """Write ``network`` (in eval mode, on CPU) as ONNX to ``path``, for images of ``input_shape`` (C, H, W),
    with ``embedded`` ({name: text}) in its metadata; returns ``path``. The file appears only once complete."""
    import onnx

    network = network.eval().cpu()
    example = (torch.zeros(2, *input_shape), torch.zeros(2, num_tabular))
    # quiet: the exporter's progress lines, its note that torchvision's operators are not registered (the network
    # uses none), onnxscript's notes on the constants it leaves unfolded and torch's own deprecation notes
    quiet = [logging.getLogger(n) for n in ("onnxscript.optimizer._constant_folding", _REGISTRATION_LOGGER)]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            program = torch.onnx.export(
                network,
                example,
                dynamo=True,
                input_names=list(ONNX_INPUTS),
                output_names=["logits"],
                # one named batch axis; the tabular one is the same symbol (naming both warns)
                dynamic_shapes={"image": {0: "batch"}, "tabular": {0: torch.export.Dim.AUTO}},
                opset_version=ONNX_OPSET,
                verbose=False,
            )
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    model = program.model_proto
    for key, text in {**embedded, "labels": json.dumps(list(LABELS))}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, text
    write_bytes_atomic(path, model.SerializeToString())
    onnx.checker.check_model(path)
    return path


def export_run_onnx(model_dir: str, path: str | None = None, metadata_file: str | None = None) -> str:
    """Export a training run's ``model.pt`` as ONNX (default ``<model_dir>/model.onnx``) with its
    ``run_settings.json`` and ``metadata_file`` embedded; returns the path written."""
    from ..explain.workflow import load_trained

    network, _, image_size, _ = load_trained(model_dir)
    args = saved_setting(model_dir, "network_args")
    sources = {"run_settings.json": os.path.join(model_dir, "run_settings.json"), "metadata.json": metadata_file}
    embedded = {}
    for name, source in sources.items():
        if source:
            with open(source) as f:
                embedded[name] = f.read()
    path = path or os.path.join(model_dir, "model.onnx")
    shape = (args.get("in_channels", 1), image_size, image_size)
    return export_onnx(network, path, shape, args["num_tabular_features"], embedded)


class OnnxModel:
    """An onnxruntime session called like the network: ``model(image, tabular)`` -> logits tensor."""

    def __init__(self, path: str):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.embedded = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        """Logits of a batch, as a tensor."""
        feed = {"image": image.cpu().numpy(), "tabular": tabular.cpu().float().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])

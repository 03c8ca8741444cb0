"""A study from a PACS over DICOMweb, its results stored back: the engine of ``scripts/to_pacs.py``.

For each X-ray instance (``modalities``, CR and DX by default) of the study: WADO-RS retrieval, the decisions of
`serving.XrayPredictor`, a Structured Report and (when a finding is positive) a Segmentation of the findings'
Grad-CAM regions (`report.dicom`), stored back with STOW-RS into the same study, and ``decisions.json`` /
``decisions.html`` of the study written locally.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from ..data.unreadable import UnreadableImageError
from ..serving import XrayPredictor, decisions_document, finding_regions

logger = logging.getLogger(__name__)


def study_instances(client, study_uid: str, modalities=("CR", "DX")) -> list[tuple[str, str]]:
    """``[(series uid, instance uid)]`` of the study's instances of ``modalities`` (QIDO-RS).

    Raises:
        ValueError: the study is unknown to the server, or holds no instance of ``modalities``.
    """
    series = client.search_for_series(search_filters={"StudyInstanceUID": study_uid})
    if not series:
        raise ValueError(f"study {study_uid} is not on the DICOMweb server {client.base_url}")
    found = []
    for item in series:
        modality = (item.get("00080060", {}).get("Value") or [""])[0]
        if modality not in modalities:
            continue
        series_uid = item["0020000E"]["Value"][0]
        for instance in client.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid):
            found.append((series_uid, instance["00080018"]["Value"][0]))
    if not found:
        present = sorted({(s.get("00080060", {}).get("Value") or ["?"])[0] for s in series})
        raise ValueError(f"study {study_uid} holds no {'/'.join(modalities)} image (its series: {', '.join(present)})")
    return found


def report_study(
    predictor: XrayPredictor,
    client,
    study_uid: str,
    output_dir: str,
    cam_threshold: float = 0.5,
    store: bool = True,
    modalities=("CR", "DX"),
) -> dict:
    """Run the study's X-rays, store an SR (and a SEG where a finding is positive) per image, write the study's
    ``decisions.json`` / ``decisions.html`` under ``output_dir``; returns what was stored, per image. An instance
    that is no readable X-ray (e.g. no pixel data) is skipped with a warning and listed as ``unreadable``.

    Raises:
        ValueError: the study is not on the server, or holds no readable X-ray of ``modalities``.
    """

    from ..report import dicom, html

    model = predictor.describe()
    os.makedirs(output_dir, exist_ok=True)
    results, pages, stored, unreadable = [], {}, [], []
    with tempfile.TemporaryDirectory() as work:
        for series_uid, instance_uid in study_instances(client, study_uid, modalities):
            source = client.retrieve_instance(study_uid, series_uid, instance_uid)
            path = os.path.join(work, f"{instance_uid}.dcm")
            source.save_as(path, enforce_file_format=True)
            try:
                prediction = predictor.predict(path, name=instance_uid)
            except UnreadableImageError as err:  # one bad instance does not cost the study's other X-rays
                logger.warning("study %s: skipped instance %s: %s", study_uid, instance_uid, err)
                unreadable.append({"image": instance_uid, "status": "unreadable", "error": str(err)})
                continue
            maps = predictor.finding_maps(prediction)
            report = dicom.structured_report(source, prediction.result, model)
            seg = dicom.segmentation(source, finding_regions(maps, cam_threshold), model)
            objects = [report] + ([seg] if seg is not None else [])
            if store:
                client.store_instances(objects, study_instance_uid=study_uid)
            stored.append(
                {
                    "series": series_uid,
                    "instance": instance_uid,
                    "tier": prediction.result["tier"],
                    "findings": prediction.result["findings"],
                    "sr": {"series": report.SeriesInstanceUID, "instance": report.SOPInstanceUID},
                    "seg": None if seg is None else {"series": seg.SeriesInstanceUID, "instance": seg.SOPInstanceUID},
                    "stored": store,
                }
            )
            results.append(prediction.result)
            pages[instance_uid] = html.write_study_page(
                os.path.join(output_dir, "report"),
                prediction.result,
                prediction.xray,
                maps,
                prediction.fields,
                cam_threshold,
            )
    if not results:
        raise ValueError(f"study {study_uid}: no readable X-ray ({'; '.join(u['error'] for u in unreadable)})")
    document = decisions_document(results, unreadable)
    document["study"] = study_uid
    document["model"] = model
    with open(os.path.join(output_dir, "decisions.json"), "w") as f:
        json.dump(document, f, indent=2)
    html.write_index(output_dir, document, pages)
    logger.info(
        "study %s: %d image(s), %d unreadable skipped, results %s",
        study_uid,
        len(stored),
        len(unreadable),
        "stored" if store else "not stored",
    )
    return {"study": study_uid, "images": stored, "unreadable": unreadable, "output_dir": output_dir}

"""Results as DICOM objects a PACS stores beside the X-ray (highdicom).

- `structured_report`: a Comprehensive SR per X-ray. Root container "Diagnostic imaging report" (LOINC 18748-4)
  holding the algorithm name and version (DCM 111001 / 111003), the source image (DCM 121324, an IMAGE reference
  that the SR's evidence also lists), the risk tier, with a risk model the tabular level and the combined tier, and
  one "Finding" (DCM 121071) per finding of the 14, whose value names the finding and whose children are its
  probability, decision threshold (both NUM, unit UCUM "1") and decision (SNOMED CT Present / Absent).
  A finding is coded in SNOMED CT where DICOM's code tables (PS3.16, as `pydicom.sr.codedict` holds them) have the
  concept (`STANDARD_FINDINGS`); the other findings, and the probability, threshold and tier concepts, use the
  private coding scheme `SCHEME` ("99MFN"), each with its plain meaning.
- `segmentation`: a binary DICOM Segmentation of the source X-ray with one segment per positive finding (its
  Grad-CAM region, `serving.finding_regions`), labelled by finding, algorithm type AUTOMATIC.
- `read_report`: the SR back as ``{model, version, tier, ..., findings: {name: {probability, threshold,
  decision}}, source}``, the check that what was stored is what was decided.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..constants import LABELS

SCHEME = "99MFN"  # private coding scheme of the concepts that have no fitting standard code
# NIH finding -> keyword of its SNOMED CT concept in DICOM's code tables; the rest have none there
STANDARD_FINDINGS = {
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "PleuralEffusion",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumothorax": "Pneumothorax",
    "Edema": "PulmonaryEdema",
    "Fibrosis": "Fibrosis",
}
SERIES_NUMBER_SR = 9001
SERIES_NUMBER_SEG = 9002


# Type 2 attributes of the patient and study modules that highdicom copies from the source into the new objects; a
# source that lacks them (common in exported secondary captures) gets them empty, as DICOM allows for Type 2
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _with_type2(source):
    """A copy of ``source``'s header (pixels left out) with the missing `_TYPE2` attributes present and empty."""
    from pydicom.dataset import Dataset

    header = Dataset()
    header.file_meta = getattr(source, "file_meta", Dataset())
    for element in source:
        if element.keyword != "PixelData":
            header.add(element)
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _codes():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    c = hd.sr.CodedConcept
    return {
        "report": c("18748-4", "LN", "Diagnostic imaging report"),
        "algorithm": codes.DCM.AlgorithmName,
        "version": codes.DCM.AlgorithmVersion,
        "source": codes.DCM.SourceImage,
        "finding": codes.DCM.Finding,
        "probability": c("MFN-P", SCHEME, "Probability of finding"),
        "threshold": c("MFN-T", SCHEME, "Decision threshold"),
        "decision": c("MFN-D", SCHEME, "Decision at threshold"),
        "tier": c("MFN-TIER", SCHEME, "Risk tier"),
        "tabular_level": c("MFN-TAB", SCHEME, "Tabular risk level"),
        "combined_tier": c("MFN-COMB", SCHEME, "Combined tier"),
        "unit": c("1", "UCUM", "no units"),
        "present": codes.SCT.Present,
        "absent": codes.SCT.Absent,
    }


def finding_code(label: str):
    """The coded concept of an NIH finding: SNOMED CT for `STANDARD_FINDINGS`, else private scheme `SCHEME` (code
    value = meaning = the NIH label)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if label not in LABELS:
        raise ValueError(f"unknown finding {label!r}; expected one of {', '.join(LABELS)}")
    if label in STANDARD_FINDINGS:
        return getattr(codes.SCT, STANDARD_FINDINGS[label])
    return hd.sr.CodedConcept(label.upper()[:16], SCHEME, label)


def finding_label(code) -> str:
    """The NIH finding of a coded concept (``CodeValue`` and ``CodingSchemeDesignator``) `finding_code` made."""
    key = (str(code.CodeValue), str(code.CodingSchemeDesignator))
    for label in LABELS:
        concept = finding_code(label)
        if (concept.value, concept.scheme_designator) == key:
            return label
    raise ValueError(f"code {key[0]} of scheme {key[1]} ({getattr(code, 'CodeMeaning', '')!r}) is no NIH finding")


def structured_report(source, result: dict, model: dict, series_instance_uid=None, sop_instance_uid=None):
    """A `highdicom.sr.ComprehensiveSR` of one X-ray's ``result`` (its entry of ``decisions.json`` plus the
    document's ``thresholds``, as `serving.XrayPredictor.predict` gives it) for the pydicom dataset ``source``;
    ``model`` holds ``name`` and ``version``."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    k = _codes()
    source = _with_type2(source)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items = [
        hd.sr.TextContentItem(k["algorithm"], str(model["name"]), relationship_type=contains),
        hd.sr.TextContentItem(k["version"], str(model["version"]), relationship_type=contains),
        hd.sr.ImageContentItem(k["source"], source.SOPClassUID, source.SOPInstanceUID, relationship_type=contains),
        hd.sr.TextContentItem(k["tier"], result["tier"], relationship_type=contains),
    ]
    if "combined_tier" in result:
        risk = result.get("tabular_risk", {})
        level = risk.get("level", risk.get("status", ""))  # no level: why not (e.g. "no tabular data")
        items.append(hd.sr.TextContentItem(k["tabular_level"], str(level), relationship_type=contains))
        items.append(hd.sr.TextContentItem(k["combined_tier"], result["combined_tier"], relationship_type=contains))
    for label in LABELS:
        finding = hd.sr.CodeContentItem(k["finding"], finding_code(label), relationship_type=contains)
        finding.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.NumContentItem(
                    k["probability"],
                    float(result["probabilities"][label]),
                    k["unit"],
                    relationship_type="HAS PROPERTIES",
                ),
                hd.sr.NumContentItem(
                    k["threshold"], float(result["thresholds"][label]), k["unit"], relationship_type="HAS PROPERTIES"
                ),
                hd.sr.CodeContentItem(
                    k["decision"],
                    k["present"] if result["decisions"][label] else k["absent"],
                    relationship_type="HAS PROPERTIES",
                ),
            ],
            is_root=False,
        )
        items.append(finding)
    root = hd.sr.ContainerContentItem(k["report"])
    root.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SERIES_NUMBER_SR,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=str(model["name"]),
        is_complete=True,
        series_description=f"{model['name']} findings",
    )


def segmentation(source, regions: dict[str, np.ndarray], model: dict, series_instance_uid=None):
    """A binary `highdicom.seg.Segmentation` of ``source`` with one segment per finding of ``regions``
    (``{finding: bool mask of the X-ray's size}``), or None when ``regions`` is empty (DICOM SEG needs a segment)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if not regions:
        return None
    source = _with_type2(source)
    shape = (int(source.Rows), int(source.Columns))
    for finding, mask in regions.items():
        if mask.shape != shape:
            raise ValueError(f"region of {finding} has shape {mask.shape}; the source image is {shape}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=str(model["name"]), version=str(model["version"]), family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=finding,
            segmented_property_category=codes.SCT.Finding,
            segmented_property_type=finding_code(finding),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, finding in enumerate(regions)
    ]
    pixels = np.stack([regions[f] for f in regions], axis=-1)[None].astype(np.uint8)  # (frames, rows, cols, segments)
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SERIES_NUMBER_SEG,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=str(model["name"]),
        manufacturer_model_name=str(model["name"]),
        software_versions=str(model["version"]),
        device_serial_number="none",
        content_label="FINDINGS",
        content_description="Grad-CAM regions of the positive findings",
        omit_empty_frames=False,
    )


def read_report(ds) -> dict:
    """The content of a `structured_report` (a pydicom dataset, e.g. as read back from a PACS)."""
    k = _codes()

    def meaning(item) -> str:
        return str(item.ConceptNameCodeSequence[0].CodeMeaning)

    out: dict = {"findings": {}}
    names = {k[key].meaning: key for key in ("algorithm", "version", "tier", "tabular_level", "combined_tier")}
    for item in ds.ContentSequence:
        name = meaning(item)
        if item.ValueType == "TEXT" and name in names:
            out[{"algorithm": "model"}.get(names[name], names[name])] = str(item.TextValue)
        elif item.ValueType == "IMAGE" and name == k["source"].meaning:
            ref = item.ReferencedSOPSequence[0]
            out["source"] = {
                "sop_class": str(ref.ReferencedSOPClassUID),
                "sop_instance": str(ref.ReferencedSOPInstanceUID),
            }
        elif item.ValueType == "CODE" and name == k["finding"].meaning:
            label = finding_label(item.ConceptCodeSequence[0])
            values: dict = {}
            for child in item.ContentSequence:
                child_name = meaning(child)
                if child_name == k["probability"].meaning:
                    values["probability"] = float(child.MeasuredValueSequence[0].NumericValue)
                elif child_name == k["threshold"].meaning:
                    values["threshold"] = float(child.MeasuredValueSequence[0].NumericValue)
                elif child_name == k["decision"].meaning:
                    values["decision"] = str(child.ConceptCodeSequence[0].CodeValue) == k["present"].value
            out["findings"][label] = values
    return out


def segment_labels(ds) -> Sequence[str]:
    """The segment labels of a DICOM Segmentation, in segment-number order."""
    return [str(s.SegmentLabel) for s in sorted(ds.SegmentSequence, key=lambda s: int(s.SegmentNumber))]

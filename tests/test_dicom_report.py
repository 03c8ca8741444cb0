"""Results as DICOM (`medfusionnet.report.dicom`): the SR and the SEG written, read back with pydicom, value by value;
and a study run through `report.pacs.report_study`."""

from __future__ import annotations

import copy
import json

import numpy as np
import pydicom
import pytest
from conftest import write_tiny_run

from medfusionnet.constants import LABELS
from medfusionnet.report import dicom

MODEL = {"name": "MedFusionNet", "version": "9.9.9"}


def result_of(probabilities: dict, threshold: float = 0.5, tier: str = "medium", risk: bool = False) -> dict:
    """An image's decisions as `serving.XrayPredictor.predict` gives them."""
    probs = {label: probabilities.get(label, 0.1) for label in LABELS}
    result = {
        "tier": tier,
        "probabilities": probs,
        "thresholds": {label: threshold for label in LABELS},
        "decisions": {label: p >= threshold for label, p in probs.items()},
        "findings": [label for label, p in probs.items() if p >= threshold],
    }
    if risk:
        result["tabular_risk"] = {"status": "ok", "level": "high"}
        result["combined_tier"] = "high"
    return result


@pytest.fixture
def source(dicom_files):
    return pydicom.dcmread(dicom_files[1])  # the one without PatientBirthDate, which highdicom copies


def test_structured_report_round_trip(source, tmp_path):
    result = result_of({"Mass": 0.8125, "Effusion": 0.25}, risk=True)
    sr = dicom.structured_report(source, result, MODEL)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    back = pydicom.dcmread(path)
    assert back.Modality == "SR" and back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID and back.PatientBirthDate == ""
    # the evidence lists the X-ray
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # one value read without read_report: the Mass finding's probability item
    mass = next(
        i for i in back.ContentSequence if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning == "Mass"
    )
    assert mass.ConceptNameCodeSequence[0].CodeValue == "121071"  # DCM Finding
    probability = mass.ContentSequence[0]
    assert probability.ConceptNameCodeSequence[0].CodeMeaning == "Probability of finding"
    assert float(probability.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.8125)
    decision = mass.ContentSequence[2].ConceptCodeSequence[0]
    assert (decision.CodeValue, decision.CodingSchemeDesignator) == ("52101004", "SCT")  # Present
    # findings in SNOMED CT where DICOM's code tables have them (codes as PS3.16 lists them), else the private scheme
    coded = {
        str(i.ConceptCodeSequence[0].CodeMeaning): (
            str(i.ConceptCodeSequence[0].CodeValue),
            str(i.ConceptCodeSequence[0].CodingSchemeDesignator),
        )
        for i in back.ContentSequence
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"
    }
    assert len(coded) == 14
    assert coded["Pleural effusion"] == ("60046008", "SCT") and coded["Pneumothorax"] == ("36118008", "SCT")
    assert coded["Pulmonary edema"] == ("19242006", "SCT") and coded["Mass"] == ("4147007", "SCT")
    assert coded["Hernia"] == ("HERNIA", "99MFN") and coded["Pleural_Thickening"] == ("PLEURAL_THICKENI", "99MFN")
    report = dicom.read_report(back)
    assert report["model"] == "MedFusionNet" and report["version"] == "9.9.9"
    assert report["tier"] == "medium" and report["tabular_level"] == "high" and report["combined_tier"] == "high"
    assert report["source"]["sop_instance"] == source.SOPInstanceUID
    assert set(report["findings"]) == set(LABELS)
    for label in LABELS:
        expected = result["probabilities"][label], 0.5, result["decisions"][label]
        got = report["findings"][label]
        assert (got["probability"], got["threshold"], got["decision"]) == pytest.approx(expected)


def test_segmentation_holds_one_segment_per_region(source, tmp_path):
    shape = (int(source.Rows), int(source.Columns))
    mass = np.zeros(shape, dtype=bool)
    mass[100:300, 200:400] = True
    hernia = np.zeros(shape, dtype=bool)
    hernia[250:500, 350:600] = True  # overlaps the mass region: SEG segments may overlap
    seg = dicom.segmentation(source, {"Mass": mass, "Hernia": hernia}, MODEL)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    back = pydicom.dcmread(path)
    assert back.Modality == "SEG" and back.SegmentationType == "BINARY"
    assert dicom.segment_labels(back) == ["Mass", "Hernia"]
    types = [s.SegmentedPropertyTypeCodeSequence[0] for s in back.SegmentSequence]
    assert [(str(t.CodeValue), str(t.CodingSchemeDesignator)) for t in types] == [
        ("4147007", "SCT"),
        ("HERNIA", "99MFN"),
    ]
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    frames = back.pixel_array.reshape(-1, *shape)
    numbers = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in back.PerFrameFunctionalGroupsSequence
    ]
    assert np.array_equal(frames[numbers.index(1)] > 0, mass)
    assert np.array_equal(frames[numbers.index(2)] > 0, hernia)
    algorithm = back.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "MedFusionNet" and algorithm.AlgorithmVersion == "9.9.9"


def test_segmentation_refusals(source):
    assert dicom.segmentation(source, {}, MODEL) is None  # a SEG needs a segment: none without a positive finding
    with pytest.raises(ValueError, match="shape"):
        dicom.segmentation(source, {"Mass": np.zeros((3, 3), dtype=bool)}, MODEL)
    with pytest.raises(ValueError, match="unknown finding"):
        dicom.finding_code("Fracture")
    fracture = pydicom.Dataset()
    fracture.CodeValue, fracture.CodingSchemeDesignator, fracture.CodeMeaning = "72704001", "SCT", "Fracture"
    with pytest.raises(ValueError, match="72704001 of scheme SCT .*Fracture.* is no NIH finding"):
        dicom.finding_label(fracture)


class _DicomwebStub:
    """The part of `dicomweb_client.DICOMwebClient` that `report.pacs.report_study` calls, over datasets in memory
    (Orthanc plays it for real in scripts/pacs_roundtrip.py)."""

    base_url = "http://pacs.invalid/dicom-web"

    def __init__(self, datasets):
        self.datasets = {str(ds.SOPInstanceUID): ds for ds in datasets}
        self.stored = []

    def search_for_series(self, search_filters):
        seen = {}
        for ds in self.datasets.values():
            if ds.StudyInstanceUID == search_filters["StudyInstanceUID"]:
                seen[ds.SeriesInstanceUID] = {
                    "00080060": {"Value": [ds.Modality]},
                    "0020000E": {"Value": [ds.SeriesInstanceUID]},
                }
        return list(seen.values())

    def search_for_instances(self, study_instance_uid, series_instance_uid):
        return [
            {"00080018": {"Value": [uid]}}
            for uid, ds in self.datasets.items()
            if ds.StudyInstanceUID == study_instance_uid and ds.SeriesInstanceUID == series_instance_uid
        ]

    def retrieve_instance(self, study_instance_uid, series_instance_uid, sop_instance_uid):
        return copy.deepcopy(self.datasets[sop_instance_uid])

    def store_instances(self, datasets, study_instance_uid):
        self.stored += [(study_instance_uid, ds) for ds in datasets]


def test_report_study_skips_an_unreadable_instance_and_stores_the_rest(source, tmp_path):
    from pydicom.uid import generate_uid

    from medfusionnet.report.pacs import report_study
    from medfusionnet.serving import XrayPredictor

    blank = copy.deepcopy(source)  # the same series, a second instance without pixel data
    blank.SOPInstanceUID = blank.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del blank.PixelData
    client = _DicomwebStub([source, blank])
    predictor = XrayPredictor(str(write_tiny_run(tmp_path / "run")))
    answer = report_study(predictor, client, source.StudyInstanceUID, str(tmp_path / "out"))
    assert [i["instance"] for i in answer["images"]] == [source.SOPInstanceUID]
    assert [u["image"] for u in answer["unreadable"]] == [blank.SOPInstanceUID]
    document = json.loads((tmp_path / "out" / "decisions.json").read_text())
    assert [i["status"] for i in document["images"]] == ["ok", "unreadable"]
    assert (tmp_path / "out" / "decisions.html").is_file()
    reports = [ds for study, ds in client.stored if ds.Modality == "SR" and study == source.StudyInstanceUID]
    assert len(reports) == 1
    back = dicom.read_report(reports[0])
    assert back["source"]["sop_instance"] == source.SOPInstanceUID
    for label in LABELS:
        assert back["findings"][label]["probability"] == pytest.approx(document["images"][0]["probabilities"][label])
    with pytest.raises(ValueError, match=f"{source.StudyInstanceUID}: no readable X-ray"):
        report_study(predictor, _DicomwebStub([blank]), source.StudyInstanceUID, str(tmp_path / "none"))

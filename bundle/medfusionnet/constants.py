"""Names shared by the package, the configs and `metadata.json`.

`LABELS` mirrors `network_data_format.outputs.pred.channel_def` in `metadata.json`, the single source of truth for
the label order; a test checks that the two agree.
"""

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_CLASSES = len(LABELS)
NO_FINDING = "No Finding"

# Columns of NIH's Data_Entry CSV that the reader needs (the 2017, v2020 and Kaggle sample files all have them).
COL_IMAGE = "Image Index"
COL_FINDINGS = "Finding Labels"
COL_FOLLOW_UP = "Follow-up #"
COL_PATIENT = "Patient ID"
COL_AGE = "Patient Age"
COL_SEX = "Patient Gender"
COL_VIEW = "View Position"
REQUIRED_COLUMNS = (COL_IMAGE, COL_FINDINGS, COL_FOLLOW_UP, COL_PATIENT, COL_AGE, COL_SEX, COL_VIEW)

# Keys of a datalist item and of a batch.
KEY_IMAGE = "image"
KEY_LABEL = "label"
KEY_TABULAR = "tabular"
KEY_PRED = "pred"
KEY_NAME = "name"  # image file name, used in output CSVs
KEY_PATIENT = "patient_id"
KEY_AGE = "age"
KEY_SEX = "sex"
KEY_VIEW = "view"
KEY_FOLLOW_UP = "follow_up"
RAW_TABULAR_KEYS = (KEY_AGE, KEY_SEX, KEY_VIEW, KEY_FOLLOW_UP)
KEY_CLINICAL = "clinical"  # the other columns of a tabular_csv row, {column: raw text}, read by the risk model
KEY_RISK = "risk"  # the patient's tabular risk assessment (risk.assessment), as JSON text

# a cell or field that holds one of these (stripped, any case), or nothing at all, is missing
MISSING_STRINGS: tuple[str, ...] = ("", "?", "na", "nan", "none")
MAX_PLAUSIBLE_AGE = 120.0  # NIH lists ages such as 412; anything above this is treated as missing
SEX_CATEGORIES = ("M", "F")
VIEW_CATEGORIES = ("PA", "AP")

# Risk levels, lowest first: the inference tier of an image and the tabular risk model's level of a patient.
RISK_LEVELS: tuple[str, ...] = ("low", "medium", "high")

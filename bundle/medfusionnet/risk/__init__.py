"""The tabular risk model: discretisation of clinical variables and the two-stage risk stratification
(`two_stage`), with the clinical bins in `risk_bins.yaml`."""

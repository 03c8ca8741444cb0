"""The tabular risk model: discretisation of clinical variables and the two-stage risk stratification
(`two_stage`), with the clinical bins in `risk_bins.yaml`, and the paper's rule-based risk levels
(`factor_levels`, conditions in `factor_levels.yaml`)."""

"""Evaluation: metrics (`metrics`), decision thresholds (`thresholds`), calibration (`calibration`), decision
support (`decision`), report files (`reports`) and the statistics of model comparisons (`comparison`)."""

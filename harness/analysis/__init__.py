"""Reading result sets: reports, comparisons, history, calibration, the plan's view."""

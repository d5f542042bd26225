"""Offline tools beside the server: eval, calibration, plots, reports, dashboards, benchmarks."""

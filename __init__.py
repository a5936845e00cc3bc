"""glmserve: disaggregated serving of GLM-5.x models on Ray Serve."""

__version__ = "0.1.0"

"""Capacity planning: hardware catalogue, profiles, the cost model, the P/D cluster simulator, the search, plots.

Public names load on first use (the simulator pulls in Ray's router API and the engine)."""

import importlib

_EXPORTS = {
    "get_hardware": "hardware",
    "Hardware": "hardware",
    "UnknownHardware": "hardware",
    "Profile": "profile",
    "ProfileError": "profile",
    "AnalyticCostModel": "cost_model",
    "ProfileCostModel": "cost_model",
    "Efficiencies": "cost_model",
    "fit_efficiencies": "cost_model",
    "PlannerSettings": "cluster",
    "InfeasibleConfig": "cluster",
    "build_deployment": "cluster",
    "ClusterSimulator": "simulator",
    "predict": "predict",
    "SearchSpace": "search",
    "run_search": "search",
    "TraceError": "workload",
    "load_workload": "workload",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

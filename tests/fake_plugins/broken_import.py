import qpc_definitely_missing_module  # noqa: F401

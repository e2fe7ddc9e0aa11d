from uora_rt._native import build_info  # noqa: F401

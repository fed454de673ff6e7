"""ml_collections configs: `get_config(arg)` per file (big_vision style: arg = preset name)."""

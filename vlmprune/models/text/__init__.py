"""Decoders, one file per HF family (config, module, weight and sharding rules)."""

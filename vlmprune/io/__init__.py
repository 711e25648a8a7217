"""Reading and writing checkpoints: safetensors files, HF weight tables, orbax directories."""

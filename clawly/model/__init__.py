"""The model: loading it (packaged default, directory, GGUF file, hub id; safetensors only), the
architecture adapter ("where are the decoder layers", "which weights write into the residual
stream", fused experts and post-writer norms), and writing safetensors shards.

`loading`, `architecture`, `experts`, `checkpoint`. Imports only the core modules (`clawly.settings`,
`errors`, `io`, `log`, `redact`, `paths`).
"""

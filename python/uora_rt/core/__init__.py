"""What an adapter is: its hyper-parameters (config), its frozen projections rebuilt from a seed
(projections) and its file (format, the `.uora` safetensors schema)."""

"""Serving-side adapters, split by lifetime: the registry (every loaded adapter by name, its host
copy and who leases it), the device slots (the adapters resident on the device, pinned while a
step uses them) and the per-step adapter batch (each token's slot; the shrink and expand kernels
of the step's routes). AdapterManager puts the three together for the runtime and the engine."""

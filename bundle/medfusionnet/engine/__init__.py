"""Training and evaluation machinery: losses (`losses`), Ignite handlers (`handlers`), resumable training
(`resume`), settings checks (`settings`), the training network, optimiser and schedule (`training`), checkpoint checks
(`checkpoints`), run settings (`run_settings`) and speed benchmarks (`benchmarking`)."""

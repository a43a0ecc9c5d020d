"""The numpy-only engine: Jacobians, finite differences, checks, spectra, statistics.
Knows nothing of any framework; sees models only through ``jacli.model.Model``."""

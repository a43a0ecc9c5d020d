"""Rich renderables built from results. Nothing here prints: the CLI does."""

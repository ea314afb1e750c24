"""The analysis: the row math of the decomposition (ΔM, ΔD), comparisons of checkpoints, series of
them, correlations, the update's spectrum and the measuring conventions. Reads through ``readers``;
knows nothing of views, training or the CLI. Import the modules themselves (nothing is re-exported)."""

"""Views of the analysis' frames: the figures (with their shared ``style``), report.md and tables.
Views read no checkpoints and compute no statistics. Import the modules themselves (nothing is
re-exported)."""

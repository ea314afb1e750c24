"""The adapter layers: ``LoRALinear`` and ``DoRALinear``, their injection into a model and PEFT's
saved format. Knows nothing of the analysis, views, training or the CLI. Import the modules
themselves (nothing is re-exported)."""

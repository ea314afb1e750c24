"""The end-to-end jobs: ``demo`` (train FT, LoRA and DoRA, analyse, draw, report) and ``study`` (a grid
of runs measured in every convention). Library code the CLI's ``demo`` and ``study`` commands call:
it composes training, readers, analysis and views, and knows nothing of the command line."""

"""Framework integrations: Hugging Face ``Trainer`` and PyTorch Lightning, one traced step per optimizer step.

Importing this package imports neither framework; each submodule imports its own when imported.
"""

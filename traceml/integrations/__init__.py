"""Framework integrations: Hugging Face ``Trainer`` and PyTorch Lightning, one traced step per optimizer step.

``traceml.integrations.huggingface`` (``TraceMLCallback``, ``TraceMLTrainer``) and
``traceml.integrations.lightning`` (``TraceMLCallback`` for ``lightning`` and
``pytorch_lightning``) each import their framework only when imported themselves;
importing this package imports neither.  ``autohook`` attaches the callbacks with no code
change under ``traceml run`` (``executor`` is the entry point that installs it).  All of
them drive the rank runtime through ``_bridge.StepDriver``.
"""

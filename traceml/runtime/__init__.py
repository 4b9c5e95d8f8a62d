"""The rank runtime: everything traceml does inside a training process.

Importing this package does not import torch: the patches are installed once the script has imported it.
"""

"""The rank runtime: everything traceml does inside a training process.

``api`` (init / shutdown / trace_step / trace_time) builds one ``agent.Agent`` per process:
bounded tables, the phase patches (``hooks``, all listed in ``patches``), CUDA event timing
(``cuda``), the sampler thread (``samplers``) and the sender thread (``sender``).
``executor`` runs a script under ``traceml run``.  Importing this package does not import
torch: the patches are installed once the script has imported it.
"""

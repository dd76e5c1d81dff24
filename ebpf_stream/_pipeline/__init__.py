"""The pipeline: a run's stages, from the probes' events to the exporters' batches.

A sample goes down the stages in this order:

- probe (``reading.py``): each probe's reader task turns what its kernel
  rings hold into ``EventMessage``\\ s (msgpack-encoded events, one message
  per drain) and sends them into the events channel (``channels.py``:
  bounded in samples, counting what it drops).
- symbolize (``symbolize.py``): decodes a message, feeds stacks to the
  ``StackResolver`` (``_symbols.stacks``) and loop records to the
  ``LoopWatch`` (``loops.py``), and yields ``Symbolized`` items: named
  samples, records with their frames (``TraceRecord``), totals, and where
  sampling began and how far it is complete.
- batch (``batch.py``): puts samples in export windows (``windows.py``),
  caps them at ``max_samples``, and emits a ``Batch`` per window into the
  batches channel.  It runs the symbolize stage inside its own task, one
  message at a time (its module says why).
- export: the exporters (``_outputs``) take the batches; the run wires that
  last task, since exporting lies above the pipeline.

``stages.py`` builds the channels and stages of one run and hands back
their tasks.
"""

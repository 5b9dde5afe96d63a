"""The studies, one module per command: each has a typed ``Config``, ``run(...)`` that returns its result in
memory and ``run_folder(...)`` that reads and writes a run folder (the demo: ``run_folder`` only, it trains its own
models into the folder).

* :mod:`~mergescope.studies.sweep` — two models merged along α with every method (thesis 000 Fig. 3.1);
* :mod:`~mergescope.studies.merge` — N models merged into one with every method;
* :mod:`~mergescope.studies.probe` — top-k images of every channel of aligned models (Figs. 3.3-3.4);
* :mod:`~mergescope.studies.compare` — τ, δ, overlap, correlation per channel pair, Observations 1-3, partial
  merging (Fig. 3.2);
* :mod:`~mergescope.studies.regress` — channels as sparse linear maps of the other model's (Fig. 3.5);
* :mod:`~mergescope.studies.demo` — all of it on the embedded digits.

The shared preamble is :mod:`~mergescope.studies.common`; the sweep and the N-model merge are one merge plan
(:mod:`~mergescope.studies.plan`).
"""

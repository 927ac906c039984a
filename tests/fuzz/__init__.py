"""Coverage-guided fuzzing of lazysnap's parsers of untrusted bytes (atheris / libFuzzer).

The contract under test: every parser fed with hostile bytes (eStargz footers, TOC
members and TOC JSON, whole eStargz blobs through the registry flow, RAFS v5/v6
bootstraps, EROFS images, nydus chunks, nydus bootstrap layers) either returns or raises
``snapshotter.errdefs.FormatError`` (``DigestMismatch`` is one), within 2 s of CPU and
bounded memory. Anything else that escapes is a finding.

Modules: ``targets`` (one function per parser), ``seeds`` (seed corpora from real
inputs), ``replay`` (run one input under limits, signatures, minimisation), ``runner``
(the libFuzzer supervisor and the campaign) and ``__main__`` (the command line,
``python -m tests.fuzz``). This package module imports nothing from ``snapshotter`` on
purpose: the fuzzing worker must import the parsers inside atheris' instrumentation.
See ``docs/fuzzing.md``.
"""

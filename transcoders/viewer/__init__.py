"""The local web viewer of runs, attribution graphs and features (``transcoders serve``).

Modules, one job each (the contract is ``docs/viewer.md``):

- :mod:`.registry`: the runs and graphs served, by id, and small caches of loaded files;
- :mod:`.data`: the JSON API's payloads (index, run overview, graph, edge pages, features, search);
- :mod:`.jobs`: the background worker that runs traces and per-head edge splits;
- :mod:`.html`: the page shell and the self-contained HTML export;
- :mod:`.app`: the Starlette app (routes, security headers, errors);
- :mod:`.encode`: JSON encoding (NaN/inf as null).
"""

"""The benchmark harness of ``bogc bench``.

- :mod:`.driver`: the command line (:func:`main`).
- :mod:`.model`: :class:`MultiModalNet` (an encoder per modality, a fusion head,
  unimodal heads).
- :mod:`.methods`: one module per training method on the small base of
  :mod:`.methods.base`; :mod:`.methods.registry` maps names to them.
- :mod:`.settings`: standard / missing / fewshot / noisy splits.
- :mod:`.protocol`: one training run with early stopping, the validation search.
- :mod:`.metrics`: accuracy, macro-F1, paired t intervals, bootstrap, Holm.
- :mod:`.report`: ``results.json``, tables, the summary, the cost plot.
- :mod:`.plots`: accuracy curves and BOGC's diagnostics.
"""

from .driver import main

__all__ = ["main"]

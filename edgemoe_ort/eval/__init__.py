"""Quality of a bundle as the runtime runs it (torch-free): :func:`evaluate` measures perplexity on a token
stream through a loaded :class:`~edgemoe_ort.runtime.generate.MoEModel`; ``edgemoe-eval`` is its CLI."""

from edgemoe_ort.eval.perplexity import MODES, EvalResult, cache_summary, evaluate

__all__ = ["MODES", "EvalResult", "cache_summary", "evaluate"]

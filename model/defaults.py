"""Defaults shared by the model code and the command line, importable without torch."""

# The backbone `sbir features`, `sbir train`, `sbir eval` and `sbir demo` use unless told otherwise.
DEFAULT_BACKBONE = "efficientnet_lite2_ms"

# What IIAE receives from the adapter (model/adapter.py, AdapterConfig.output): "bn" or "l2".
DEFAULT_ADAPTER_OUTPUT = "l2"

# Decay of the moving average of IIAE's weights that is validated, kept and served (0: the raw weights).
DEFAULT_IIAE_EMA = 0.998

# The served second stage (model/rerank.py): which vector re-orders IIAE's top candidates ("infonce",
# "adapter" or "none"), how many candidates, that vector's share of the score, and the share of the
# backbone's standardised features (0: not used).
DEFAULT_RERANK = "infonce"
DEFAULT_RERANK_TOP = 400
DEFAULT_RERANK_WEIGHT = 0.5
DEFAULT_RERANK_RAW_WEIGHT = 0.25

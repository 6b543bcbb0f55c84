"""The name transformers gives the cache argument: ``cache`` from 5.2x on (``past_key_values``
is deprecated and goes in 5.40), ``past_key_values`` before. Passing the current name keeps
the server log free of deprecation warnings; reading it from the signature keeps older 5.x
installs (such as a GPU machine's) working."""

from __future__ import annotations

import inspect

from transformers.masking_utils import create_causal_mask

CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

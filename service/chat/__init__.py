"""Image + instruction chat on a LLaVA backbone: routes, request parsing, the generation engine."""

"""Zero-shot and adapted classification on a CLIP backbone: routes, the batch handler, the text cache."""

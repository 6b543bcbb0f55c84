"""Front-end processes (``--frontends N``): classify's HTTP and image work beside the model's process."""

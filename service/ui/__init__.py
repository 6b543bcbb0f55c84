"""The playground: a static page and script at / that drive the public API from a browser."""

"""Prompt adapters: MaPLe learner and folded form, the adapter file format, importers.

Must not import ``service``; the service builds on this package.
"""

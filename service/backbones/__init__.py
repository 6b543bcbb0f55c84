"""Frozen backbones and their prompted forward passes."""

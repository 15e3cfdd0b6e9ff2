"""Sandbox for untrusted candidate code: one runner for every compile, benchmark and profile job.

Modules here run on GPU machines too: they import only the stdlib, torch, triton, numpy and
this package (plus `kda.tools.errors`).
"""

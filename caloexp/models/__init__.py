"""Generative model families. Each differs from the others only where its maths does:
its networks, its losses and the order of its updates (see :mod:`caloexp.models.base`)."""

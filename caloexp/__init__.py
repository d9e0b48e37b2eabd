"""caloexp: an experiment platform for generative fast calorimeter simulation."""
__version__ = "0.1.0"

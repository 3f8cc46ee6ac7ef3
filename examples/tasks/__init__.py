"""Small tasks made in code for the recipe examples: they train in minutes on a CPU from random init."""

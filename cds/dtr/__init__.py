"""Da Vinci DTR: the documentation forms a determination leaves open, their packages, and the answers."""

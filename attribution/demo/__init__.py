"""The demo: a small CNN on scikit-learn's digits, recorded and explained end to end."""

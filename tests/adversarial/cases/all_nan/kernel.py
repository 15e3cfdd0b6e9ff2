"""Attack: write NaN everywhere (a NaN-tolerant comparison would pass it)."""
import torch


def run(hidden_states, weight, output):
    output.fill_(float("nan"))

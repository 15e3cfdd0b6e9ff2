"""Attack: zero the inputs so a reference computed afterwards in the same process sees zeros too."""
import torch


def run(hidden_states, weight, output):
    hidden_states.zero_()
    weight.zero_()
    output.zero_()

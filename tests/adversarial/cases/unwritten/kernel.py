"""Attack: leave the output buffer as it is (an allocator that hands back the previous result's memory
would make a harness without poisoned outputs pass it)."""


def run(hidden_states, weight, output):
    return None

"""Attack (or bug): never return."""


def run(hidden_states, weight, output):
    while True:
        pass

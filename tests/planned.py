"""A probe whose plan is given: for the scheduler's refusals (an empty plan, repeated unit keys) on every engine."""

from headlab.probe import Unit


def with_plan(probe, keys: list[str]):
    """A probe like `probe` whose plan is one unit per key of `keys` (each runs the probe's first real unit)."""

    class Planned(type(probe)):
        def plan(self, model, params):
            first = super().plan(model, params)[0]
            return [Unit(key, first.data) for key in keys]

    return Planned()

"""MAML++'s multi-step loss (MSL): per-step query-loss weights annealed over outer iterations."""

from __future__ import annotations

__all__ = ["multi_step_loss_weights"]

# The MAML++ code keeps every non-final step's weight at least 0.03 / steps.
_MIN_SHARE = 0.03


def multi_step_loss_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float] | None:
    """Weights w_1 .. w_steps of the query losses after each inner step, or None (last step only).

    They start equal (1 / steps) and move linearly, over `anneal_iterations` outer iterations,
    to the last step: each earlier weight falls to 0.03 / steps, the last one rises to
    1 - (steps - 1) * 0.03 / steps; they always sum to 1. From `anneal_iterations` on (and when
    it is 0, or there is one step) only the last step's loss counts. This is the importance vector of the MAML++ code
    (`get_per_step_loss_importance_vector`) with the epoch counter replaced by the fraction of
    `anneal_iterations` done.

    Example:
        >>> multi_step_loss_weights(2, 0, 10)
        [0.5, 0.5]
        >>> [round(w, 3) for w in multi_step_loss_weights(2, 5, 10)]
        [0.25, 0.75]
        >>> multi_step_loss_weights(2, 10, 10) is None
        True
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(anneal_iterations, int) or anneal_iterations < 0:
        raise ValueError(f"anneal_iterations must be an integer >= 0, got {anneal_iterations!r}")
    if iteration >= anneal_iterations or steps == 1:
        return None
    progress = max(iteration, 0) / anneal_iterations
    floor = _MIN_SHARE / steps
    earlier = max(1 / steps - progress / steps, floor)
    last = min(1 / steps + progress * (steps - 1) / steps, 1 - (steps - 1) * floor)
    return [earlier] * (steps - 1) + [last]


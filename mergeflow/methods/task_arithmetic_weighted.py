"""Task Arithmetic with a weight per expert, mergekit's `task_arithmetic`: theta_0 + lambda * sum_i w_i tau_i
(divided by sum_i w_i with `normalize`); weights may follow the layers (gradients) or tensor names (filters)."""

from __future__ import annotations

from mergeflow.methods.gta import GeneralizedTaskArithmetic, GtaParams


class TaskArithmeticWeightedParams(GtaParams):
    pass


class TaskArithmeticWeighted(GeneralizedTaskArithmetic):
    name = "task_arithmetic_weighted"
    summary = "theta_0 + lambda * sum of w_i tau_i, w_i per expert and per layer (mergekit's task_arithmetic)."
    Params = TaskArithmeticWeightedParams
    sweep_grid = {"scaling": [round(0.1 * i, 1) for i in range(1, 11)]}
    elementwise = True

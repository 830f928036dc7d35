"""Search spaces, Optuna sampling, Ray Tune execution, storage, Pareto fronts and export."""

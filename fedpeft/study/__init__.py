"""Studies around runs: comparisons of strategies over the same users and seeds (tables, paired
statistics, plots, majority-label baselines), and studies that are checked first and resume."""
